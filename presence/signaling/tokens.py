"""Signed, expiring join tokens: ``base64url(json payload) "." base64url(HMAC-SHA256)``.

A token says who may join (``sub``), optionally which room (``room``, then forced by the
server), and until when (``exp``, Unix seconds). Expiry is absolute, so wall-clock time
(``time.time``) is the right clock here, unlike the bot's monotonic clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

MAX_TOKEN_CHARS = 4096  # far above any real token; refuse to hash megabytes of junk


class TokenError(Exception):
    """A token was refused; ``code`` is one of the stable error codes sent to clients."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class TokenClaims:
    room: str | None
    sub: str
    exp: int


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    # validate=True rejects characters outside the alphabet instead of silently skipping them
    padded = text + "=" * (-len(text) % 4)
    return base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)


def _sign(secret: str, signing_input: str) -> bytes:
    return hmac.new(secret.encode("utf-8"), signing_input.encode("ascii"), hashlib.sha256).digest()


def mint(secret: str, *, room: str | None, sub: str, ttl_s: int, now: float | None = None) -> str:
    """A token for ``sub`` (optionally bound to ``room``) valid for ``ttl_s`` seconds."""
    if not secret:
        raise ValueError("cannot mint a token without a secret")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    issued = time.time() if now is None else now
    payload = {"exp": int(issued + ttl_s), "room": room, "sub": sub}
    body = _b64encode(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8"))
    return body + "." + _b64encode(_sign(secret, body))


def verify(secret: str, token: str | None, *, now: float | None = None) -> TokenClaims:
    """The claims of a valid token; raises :class:`TokenError` for anything else."""
    if not token:
        raise TokenError("missing_token", "a join token is required")
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise TokenError("malformed_token", "the join token is not in the expected format")
    body, sig_text = token.split(".")
    try:
        sig = _b64decode(sig_text)
        raw = _b64decode(body)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise TokenError("malformed_token", "the join token is not valid base64url") from None
    # signature first: nothing unauthenticated is parsed beyond base64
    if not hmac.compare_digest(sig, _sign(secret, body)):
        raise TokenError("bad_signature", "the join token's signature does not match")
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise TokenError("malformed_token", "the join token's payload is not JSON") from None
    if not isinstance(payload, dict):
        raise TokenError("malformed_token", "the join token's payload is not an object")
    exp, sub, room = payload.get("exp"), payload.get("sub"), payload.get("room")
    if (
        not isinstance(exp, int)
        or isinstance(exp, bool)
        or not isinstance(sub, str)
        or not (room is None or isinstance(room, str))
    ):
        raise TokenError("malformed_token", "the join token's claims have the wrong types")
    current = time.time() if now is None else now
    if current >= exp:
        raise TokenError("expired_token", "the join token has expired")
    return TokenClaims(room=room, sub=sub, exp=exp)
