"""qmailtui's mail transfer agent: qmail 1.03's behaviour, one asyncio process."""
