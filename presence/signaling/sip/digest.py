"""HTTP digest for SIP (RFC 3261 22, RFC 2617 with MD5; qop=auth when the challenge offers it).

``sipmessage`` parses and prints the headers; the response hash is the few lines below.
"""

from __future__ import annotations

import hashlib
import secrets

from sipmessage import AuthChallenge, AuthCredentials, AuthParameters


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def answer_challenge(
    challenge: AuthChallenge, *, method: str, uri: str, username: str, password: str, nc: int = 1
) -> AuthCredentials:
    """Credentials that answer a 401/407 challenge for one request."""
    p = challenge.parameters
    if challenge.scheme.lower() != "digest":
        raise ValueError(f"cannot answer a {challenge.scheme} challenge (digest only)")
    algorithm = p.get("algorithm", "MD5")
    if algorithm.upper() != "MD5":
        raise ValueError(f"digest algorithm {algorithm} is not supported (MD5 only)")
    realm, nonce = p.get("realm", ""), p.get("nonce", "")
    ha1 = _md5(f"{username}:{realm}:{password}")
    ha2 = _md5(f"{method}:{uri}")
    fields: dict[str, str] = {"username": username, "realm": realm, "nonce": nonce, "uri": uri}
    qops = [q.strip() for q in p.get("qop", "").split(",") if q.strip()]
    if "auth" in qops:
        cnonce, count = secrets.token_hex(8), f"{nc:08x}"
        fields |= {"qop": "auth", "nc": count, "cnonce": cnonce}
        fields["response"] = _md5(f"{ha1}:{nonce}:{count}:{cnonce}:auth:{ha2}")
    else:
        fields["response"] = _md5(f"{ha1}:{nonce}:{ha2}")
    fields["algorithm"] = "MD5"
    if "opaque" in p:
        fields["opaque"] = p["opaque"]
    return AuthCredentials(scheme="Digest", parameters=AuthParameters(**fields))
