"""qmail-send's rewriting and local/remote split (spec/send.md §2)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import control
from core.control import Config
from core.paths import QmailRoot
from core.rewrite import route, unvirtual

ME = "mx.example.org"

VIRTUALDOMAINS = (
    "joe@virt.example:alice\n"  # a virtual user: checked first
    "virt.example:bob\n"  # the whole domain
    ".virt.example:carol\n"  # every subdomain
    ".a.virt.example:dave\n"  # a longer suffix, listed later: still tried first
    "except.example:\n"  # an exception: not virtual, remote
    "nowhere.mil:joe-foo\n"  # send.md's own example
)
CATCH_ALL = ":catchall\n"  # everything else that is not local


def configure(root: QmailRoot, **files: str) -> Config:
    for name, text in files.items():
        root.control_file(name).write_text(text)
    config = control.load(root)
    assert config.errors == []
    return config


@pytest.fixture(params=[False, True], ids=["", "catch-all"])
def has_catch_all(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def config(root: QmailRoot, has_catch_all: bool) -> Config:
    return configure(
        root,
        locals=f"{ME}\nlocal.example\n",
        virtualdomains=VIRTUALDOMAINS + (CATCH_ALL if has_catch_all else ""),
        percenthack="hack.example\nrelay.example\n",
        envnoathost="noat.example\n",
    )


@pytest.mark.parametrize(
    ("address", "channel", "rewritten"),
    [
        # envnoathost
        ("joe", "remote", "joe@noat.example"),
        # percenthack: only at listed domains, the last % becomes the @
        ("user%host.example@hack.example", "remote", "user@host.example"),
        ("user%host.example@HACK.example", "remote", "user@host.example"),
        ("user%host%relay.example@hack.example", "remote", "user@host"),
        ("user%host%other.example@hack.example", "remote", "user%host@other.example"),
        ("user@hack.example", "remote", "user@hack.example"),  # no %: nothing to do
        ("user%host.example@other.example", "remote", "user%host.example@other.example"),
        ("joe%local.example@hack.example", "local", "joe@local.example"),  # then locals
        # locals: exact, case-insensitive, address unchanged
        (f"joe@{ME}", "local", f"joe@{ME}"),
        ("Joe@LOCAL.Example", "local", "Joe@LOCAL.Example"),
        ("joe@sub.local.example", "remote", "joe@sub.local.example"),  # no subdomain match
        # virtualdomains precedence: user@domain > domain > .suffix longest first > catch-all
        ("joe@virt.example", "local", "alice-joe@virt.example"),
        ("JOE@Virt.Example", "local", "alice-JOE@Virt.Example"),
        ("ann@virt.example", "local", "bob-ann@virt.example"),
        ("ann@b.virt.example", "local", "carol-ann@b.virt.example"),
        ("ann@a.virt.example", "local", "carol-ann@a.virt.example"),  # .a.virt.example ≠ a.
        ("ann@x.a.virt.example", "local", "dave-ann@x.a.virt.example"),
        ("joe@b.virt.example", "local", "carol-joe@b.virt.example"),  # user key is exact
        ("info@nowhere.mil", "local", "joe-foo-info@nowhere.mil"),
        ("ann@other.example", "remote", "ann@other.example"),  # the catch-all's, if any
        # an empty prepend is an exception: not virtual, and the catch-all is not used
        ("ann@except.example", "remote", "ann@except.example"),
        ("ann@sub.except.example", "remote", "ann@sub.except.example"),  # the catch-all's
    ],
)
def test_route_follows_send_md_section_2(
    config: Config, has_catch_all: bool, address: str, channel: str, rewritten: str
) -> None:
    """With a `:catchall` line, every remote address but the exception becomes local."""
    if has_catch_all and channel == "remote" and rewritten != "ann@except.example":
        channel, rewritten = "local", f"catchall-{rewritten}"
    routed = route(config, address)
    assert (routed.channel, routed.address) == (channel, rewritten)
    assert routed.reason


def test_envnoathost_defaults_to_me_so_a_bare_user_is_local(root: QmailRoot) -> None:
    routed = route(control.load(root), "postmaster")
    assert (routed.channel, routed.address) == ("local", f"postmaster@{ME}")


def test_a_local_domain_is_never_looked_up_in_virtualdomains(root: QmailRoot) -> None:
    config = configure(root, virtualdomains=f"{ME}:zed\njoe@{ME}:alice\n")
    routed = route(config, f"joe@{ME}")
    assert (routed.channel, routed.address) == ("local", f"joe@{ME}")


def test_without_virtualdomains_a_foreign_domain_is_remote(root: QmailRoot) -> None:
    routed = route(control.load(root), "joe@example.net")
    assert (routed.channel, routed.address) == ("remote", "joe@example.net")


def test_percenthack_is_not_applied_at_unlisted_domains(root: QmailRoot) -> None:
    routed = route(control.load(root), f"joe%example.net@{ME}")
    assert (routed.channel, routed.address) == ("local", f"joe%example.net@{ME}")


def test_address_with_several_at_signs_splits_at_the_last(root: QmailRoot) -> None:
    config = configure(root, virtualdomains="b.example:v\n")
    assert route(config, "a@x@b.example").address == "v-a@x@b.example"


@pytest.mark.parametrize(
    ("rewritten", "original"),
    [
        ("bob-ann@virt.example", "ann@virt.example"),  # domain entry
        ("carol-ann@b.virt.example", "ann@b.virt.example"),  # suffix entry
        ("dave-ann@x.a.virt.example", "ann@x.a.virt.example"),  # longest suffix
        ("catchall-ann@other.example", "ann@other.example"),  # catch-all, if there is one
        ("joe-foo-info@nowhere.mil", "info@nowhere.mil"),
        ("alice-joe@virt.example", "alice-joe@virt.example"),  # user entry: kept
        ("ann@except.example", "ann@except.example"),  # exception: nothing to strip
        ("someone@virt.example", "someone@virt.example"),  # no prefix to strip
        # a local domain is never rewritten, so a local part that looks prefixed stays
        (f"catchall-ann@{ME}", f"catchall-ann@{ME}"),
        ("catchall-x@local.example", "catchall-x@local.example"),
    ],
)
def test_unvirtual_strips_what_route_added(
    config: Config, has_catch_all: bool, rewritten: str, original: str
) -> None:
    if not has_catch_all and rewritten.startswith("catchall-") and original != rewritten:
        original = rewritten  # without the catch-all line there is nothing to undo
    assert unvirtual(config, rewritten) == original


def test_unvirtual_keeps_an_address_route_could_not_have_made(root: QmailRoot) -> None:
    """`bob-joe@virt.example` comes from the user entry for joe, not from the domain's."""
    config = configure(root, virtualdomains="joe@virt.example:other\nvirt.example:bob\n")
    assert unvirtual(config, "bob-joe@virt.example") == "bob-joe@virt.example"
    assert unvirtual(config, "bob-ann@virt.example") == "ann@virt.example"


# -- properties ---------------------------------------------------------------

PROPERTY = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# A small alphabet, so that generated addresses hit the generated tables.
DOMAIN = st.sampled_from(["a.example", "b.a.example", "c.example", "A.Example", "x", ""])
LOCAL = st.text(st.sampled_from("jo%@.-"), max_size=6)
ADDRESS = st.one_of(
    st.text(max_size=30),
    st.builds(lambda lp, d: f"{lp}@{d}", LOCAL, DOMAIN),
    st.builds(lambda lp, h, d: f"{lp}%{h}@{d}", LOCAL, DOMAIN, DOMAIN),
)
KEY = st.one_of(
    DOMAIN.map(str.lower),
    DOMAIN.map(lambda d: "." + d.lower().partition(".")[2]),
    st.builds(lambda lp, d: f"{lp}@{d}".lower(), LOCAL, DOMAIN),
)
PREPEND = st.one_of(st.just(""), st.text(st.sampled_from("vwz-"), min_size=1, max_size=3))


@st.composite
def tables(draw: st.DrawFn, base: Config) -> Config:
    return dataclasses.replace(
        base,
        locals=draw(st.frozensets(DOMAIN.map(str.lower), max_size=3)),
        percenthack=draw(st.frozensets(DOMAIN.map(str.lower), max_size=3)),
        virtualdomains=draw(st.dictionaries(KEY, PREPEND, max_size=6)),
        envnoathost=draw(DOMAIN),
    )


def model(config: Config, address: str) -> tuple[bool, str, str | None]:
    """send.md §2 written out again: (is local, address before virtualdomains, prepend)."""
    if "@" not in address:
        address += "@" + config.envnoathost
    while True:
        at = address.rindex("@")
        if address[at + 1 :].lower() not in config.percenthack:
            break
        percent = address.rfind("%", 0, at)
        if percent < 0:
            break
        address = address[:percent] + "@" + address[percent + 1 : at]
    at = address.rindex("@")
    domain = address[at + 1 :].lower()
    if domain in config.locals:
        return True, address, None
    keys = [address.lower(), domain]
    keys += [domain[i:] for i in range(len(domain)) if domain[i] == "."]
    keys.append("")
    for key in keys:
        if key in config.virtualdomains:
            prepend = config.virtualdomains[key]
            return bool(prepend), address, prepend or None
    return False, address, None


@PROPERTY
@given(data=st.data(), address=ADDRESS)
def test_route_is_total_and_local_iff_locals_or_a_virtual_prepend_applies(
    root: QmailRoot, data: st.DataObject, address: str
) -> None:
    config = data.draw(tables(control.load(root)))
    routed = route(config, address)
    is_local, plain, prepend = model(config, address)
    assert routed.channel == ("local" if is_local else "remote")
    assert routed.address == (f"{prepend}-{plain}" if prepend else plain)


@PROPERTY
@given(data=st.data(), address=ADDRESS)
def test_unvirtual_undoes_a_domain_suffix_or_catch_all_prefix(
    root: QmailRoot, data: st.DataObject, address: str
) -> None:
    config = data.draw(tables(control.load(root)))
    routed = route(config, address)
    is_local, plain, prepend = model(config, address)
    by_user_key = plain.lower() in config.virtualdomains
    if prepend and not by_user_key:
        assert unvirtual(config, routed.address) == plain
    elif is_local and not by_user_key:  # by locals: never rewritten, so nothing to undo
        assert unvirtual(config, routed.address) == routed.address
    else:
        # A user@domain key's prefix is not looked for; when the domain's own entry
        # has the same prefix, undoing it is right: whatever unvirtual gives
        # routes back to the same address.
        undone = unvirtual(config, routed.address)
        assert undone == routed.address or route(config, undone).address == routed.address
