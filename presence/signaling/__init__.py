"""Getting a peer into a call: HTTP offer/answer, WHIP, rooms, tokens (aiohttp)."""
