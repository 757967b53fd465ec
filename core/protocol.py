"""Control-socket messages: one JSON object per line, versioned; no I/O here.

Request:  {"v": 1, "id": 7, "op": "list", "args": {...}}
Reply:    {"v": 1, "id": 7, "ok": true, "result": ...}
          {"v": 1, "id": 7, "ok": false, "error": {"code": "...", "message": "..."}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

VERSION = 1
MAX_LINE = 1 << 20  # a longer request is refused and the client disconnected


class ProtocolError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Request:
    id: int | str | None
    op: str
    args: dict[str, Any]


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def request(rid: int, op: str, args: dict[str, Any]) -> bytes:
    return encode({"v": VERSION, "id": rid, "op": op, "args": args})


def decode_request(line: bytes) -> Request:
    try:
        data = json.loads(line)
    except ValueError as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProtocolError("a request is a JSON object")
    if data.get("v", VERSION) != VERSION:
        raise ProtocolError(f"unsupported protocol version {data.get('v')!r}; this core speaks 1")
    op = data.get("op")
    args = data.get("args", {})
    rid = data.get("id")
    if not isinstance(op, str) or not isinstance(args, dict):
        raise ProtocolError("a request needs a string 'op' and an object 'args'")
    if rid is not None and not isinstance(rid, int | str):
        raise ProtocolError("'id' must be a number or a string")
    return Request(rid, op, args)


def ok(rid: int | str | None, result: Any) -> bytes:
    return encode({"v": VERSION, "id": rid, "ok": True, "result": result})


def error(rid: int | str | None, code: str, message: str) -> bytes:
    return encode(
        {"v": VERSION, "id": rid, "ok": False, "error": {"code": code, "message": message}}
    )


def event(kind: str, data: dict[str, Any]) -> bytes:
    return encode({"v": VERSION, "event": kind, "data": data})


def decode_reply(line: bytes) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except ValueError as e:
        raise ProtocolError(f"the core sent something that is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProtocolError("the core sent something that is not a JSON object")
    return data
