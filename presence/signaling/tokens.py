"""Join tokens (JWT, HS256 via PyJWT) and the per-peer resource tokens that authorise hang-up.

A join token says who joins (``sub``), which room (``room``: without it the token only starts a
one-to-one call), optionally the display name the server forces (``name``) and a role
(``role``, default ``"caller"``), and until when (``exp``, required; ``iat`` when present must
not lie in the future). Only HS256 is accepted: ``alg: none`` and every other algorithm are
refused before anything else is looked at. Expiry is absolute, so wall-clock time is the right
clock here, unlike the bot's monotonic clock.

Every refusal is a :class:`TokenError` with a stable ``code`` that signaling sends to clients.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Any

import jwt

ALGORITHM = "HS256"  # the only one accepted; never taken from the token's own header
MAX_TOKEN_CHARS = 4096  # far above any real token; refuse to parse megabytes of junk
LEEWAY_S = 5  # clock skew between the token's issuer and this server
ROOM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_SUB_CHARS = 256
MAX_ROLE_CHARS = 32
DEFAULT_ROLE = "caller"

try:  # PyJWT >= 2.10 warns about HMAC keys under 32 bytes; signaling logs that once instead
    from jwt.warnings import InsecureKeyLengthWarning

    warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)
except ImportError:  # older PyJWT: no such warning
    pass


class TokenError(Exception):
    """A token was refused; ``code`` is one of the stable error codes sent to clients:
    ``missing_token``, ``malformed_token``, ``bad_signature``, ``unsupported_algorithm``,
    ``expired_token``, ``not_yet_valid``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class TokenClaims:
    room: str | None  # None: a one-to-one call only (when a secret is set)
    sub: str
    exp: int
    name: str | None = None  # the display name the server uses, whatever the client asks for
    role: str = DEFAULT_ROLE
    iat: int | None = None
    language: str | None = None  # an interpreter room: the language this participant speaks


def short_secret(secret: str) -> bool:
    """True when the secret is shorter than HS256's 32-byte key (weak against brute force)."""
    return len(secret.encode("utf-8")) < 32


def mint(
    secret: str,
    *,
    room: str | None,
    sub: str,
    ttl_s: int,
    now: float | None = None,
    name: str | None = None,
    role: str = DEFAULT_ROLE,
    language: str | None = None,
) -> str:
    """A token for ``sub`` (bound to ``room`` when given) valid for ``ttl_s`` seconds."""
    if not secret:
        raise ValueError("cannot mint a token without a secret")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + int(ttl_s), "role": role}
    if room is not None:
        payload["room"] = room
    if name is not None:
        payload["name"] = name
    if language is not None:
        payload["language"] = language
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def _header_alg(token: str) -> object:
    try:
        return jwt.get_unverified_header(token).get("alg")
    except jwt.PyJWTError:
        raise TokenError("malformed_token", "the join token is not a well-formed JWT") from None


def verify(secret: str, token: str | None) -> TokenClaims:
    """The claims of a valid token; raises :class:`TokenError` for anything else."""
    if not token:
        raise TokenError("missing_token", "a join token is required")
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise TokenError("malformed_token", "the join token is not in the expected format")
    alg = _header_alg(token)
    if alg != ALGORITHM:
        raise TokenError("unsupported_algorithm", f"join tokens must be signed with {ALGORITHM}")
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sub"]},
            leeway=LEEWAY_S,
        )
    except jwt.InvalidSignatureError:  # a DecodeError subclass: before it
        raise TokenError("bad_signature", "the join token's signature does not match") from None
    except jwt.ExpiredSignatureError:
        raise TokenError("expired_token", "the join token has expired") from None
    except jwt.ImmatureSignatureError:
        raise TokenError("not_yet_valid", "the join token is not valid yet (iat/nbf in the future)") from None
    except jwt.InvalidAlgorithmError:
        raise TokenError("unsupported_algorithm", f"join tokens must be signed with {ALGORITHM}") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError("malformed_token", f"the join token lacks the {exc.claim!r} claim") from None
    except jwt.PyJWTError:  # DecodeError, bad iat/sub types, anything else PyJWT refuses
        raise TokenError("malformed_token", "the join token is not a well-formed JWT") from None
    return _claims(payload)


def _claims(payload: dict[str, Any]) -> TokenClaims:
    def bad(message: str) -> TokenError:
        return TokenError("malformed_token", f"the join token's claims are invalid: {message}")

    exp, sub, room = payload.get("exp"), payload.get("sub"), payload.get("room")
    name, role, iat = payload.get("name"), payload.get("role", DEFAULT_ROLE), payload.get("iat")
    if not isinstance(exp, int) or isinstance(exp, bool):
        raise bad("exp must be an integer")
    if iat is not None and (not isinstance(iat, int) or isinstance(iat, bool)):
        raise bad("iat must be an integer")
    if not isinstance(sub, str) or not sub or len(sub) > MAX_SUB_CHARS:
        raise bad(f"sub must be a string of 1-{MAX_SUB_CHARS} characters")
    if room is not None and (not isinstance(room, str) or not ROOM_RE.match(room)):
        raise bad("room must be 1-64 letters, digits, '_', '-' or '.'")
    if name is not None and not isinstance(name, str):
        raise bad("name must be a string")
    if not isinstance(role, str) or not role or len(role) > MAX_ROLE_CHARS:
        raise bad(f"role must be a string of 1-{MAX_ROLE_CHARS} characters")
    language = payload.get("language")
    if language is not None and (not isinstance(language, str) or not 2 <= len(language) <= 16):
        raise bad("language must be a language code such as 'es'")
    return TokenClaims(room=room, sub=sub, exp=exp, name=name or None, role=role, iat=iat, language=language)


class ResourceTokens:
    """Per-peer secrets that authorise hanging that peer up (``DELETE`` of its resource).

    A resource token is HMAC-SHA256 over the peer id under a random key of this process: as
    unguessable as a stored random secret, but nothing is stored, so peers that end without a
    ``DELETE`` (timeout, closed tab) leave nothing behind, and a restart voids every token
    along with the calls. Only the offer's answer carries it; events never do.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def issue(self, peer_id: str) -> str:
        digest = hmac.new(self._key, b"presence-resource:" + peer_id.encode("utf-8"), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")

    def check(self, peer_id: str, presented: str | None) -> bool:
        if not presented or len(presented) > 128:
            return False
        return hmac.compare_digest(self.issue(peer_id).encode("ascii"), presented.encode("utf-8"))
