"""SIP dialogs and the messages built inside them (RFC 3261 12, 8.2.6), on ``sipmessage``.

A ``Dialog`` is the state both ends share once a call is set up: Call-ID, the two tags, the
remote target (its Contact), the route set and the CSeq counters. It builds in-dialog requests
(BYE, re-INVITE, REFER) and knows where they go. ``reply`` builds any response to a request.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from sipmessage import URI, Address, CSeq, Parameters, Request, Response, Via

USER_AGENT = "Presence"
ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, REFER, NOTIFY"
MAGIC = "z9hG4bK"  # RFC 3261 branch prefix

Addr = tuple[str, int]


def new_tag() -> str:
    return secrets.token_hex(6)


def new_branch() -> str:
    return MAGIC + secrets.token_hex(8)


def reply(
    request: Request, code: int, phrase: str, *, to_tag: str | None = None, body: bytes = b""
) -> Response:
    """A response to ``request`` (RFC 3261 8.2.6): Via, From, Call-ID and CSeq copied, To
    with our tag unless it has one (a 100 Trying carries none)."""
    response = Response(code, phrase, body)
    response.headers.setlist("Via", request.headers.getlist("Via"))
    response.headers.set("From", request.headers["From"])
    to = request.to_address
    if to_tag and "tag" not in to.parameters and code != 100:
        to = Address(uri=to.uri, name=to.name, parameters=to.parameters.replace(tag=to_tag))
    response.to_address = to
    response.headers.set("Call-ID", request.call_id)
    response.headers.set("CSeq", str(request.cseq))
    response.headers.set("Server", USER_AGENT)
    return response


def target_addr(uri: URI, fallback: Addr) -> Addr:
    """Where a request for ``uri`` goes: its host and port when the host is an IP address
    (a name would need DNS, which a bot on a private network may not have), else ``fallback``
    (the address the peer's messages come from: right behind a NAT too)."""
    host = uri.host or ""
    if host.replace(".", "").isdigit() or ":" in host:
        return host.strip("[]"), int(uri.port or 5060)
    return fallback


@dataclass
class Dialog:
    """One call's dialog, from our side."""

    call_id: str
    local: Address  # our From (as UAC) or To (as UAS) address, with our tag
    remote: Address  # theirs, with their tag
    remote_target: URI  # their Contact: in-dialog requests go here
    contact: URI  # ours
    peer_addr: Addr  # where their messages came from
    route_set: list[Address] = field(default_factory=list)
    local_cseq: int = 0
    remote_cseq: int = -1

    @property
    def local_tag(self) -> str:
        return self.local.parameters.get("tag", "")

    @property
    def remote_tag(self) -> str:
        return self.remote.parameters.get("tag", "")

    @classmethod
    def as_uas(cls, invite: Request, local_tag: str, contact: URI, peer_addr: Addr) -> Dialog:
        """The dialog an INVITE we answer creates (RFC 3261 12.1.1)."""
        to = invite.to_address
        contacts = invite.contact
        return cls(
            call_id=invite.call_id,
            local=Address(uri=to.uri, name=to.name, parameters=to.parameters.replace(tag=local_tag)),
            remote=invite.from_address,
            remote_target=contacts[0].uri if contacts else invite.from_address.uri,
            contact=contact,
            peer_addr=peer_addr,
            route_set=list(invite.record_route),
            remote_cseq=invite.cseq.sequence,
        )

    @classmethod
    def as_uac(cls, invite: Request, ok: Response, contact: URI, peer_addr: Addr) -> Dialog:
        """The dialog a 2xx to our INVITE creates (RFC 3261 12.1.2): routes in reverse."""
        contacts = ok.contact
        return cls(
            call_id=invite.call_id,
            local=invite.from_address,
            remote=ok.to_address,
            remote_target=contacts[0].uri if contacts else invite.uri,
            contact=contact,
            peer_addr=peer_addr,
            route_set=list(reversed(ok.record_route)),
            local_cseq=invite.cseq.sequence,
        )

    def next_hop(self) -> Addr:
        if self.route_set:
            return target_addr(self.route_set[0].uri, self.peer_addr)
        return target_addr(self.remote_target, self.peer_addr)

    def request(self, method: str, local_addr: Addr, body: bytes = b"") -> Request:
        """A new in-dialog request (RFC 3261 12.2.1.1; loose routing only)."""
        if method not in ("ACK", "CANCEL"):
            self.local_cseq += 1
        request = new_request(
            method, self.remote_target, local_addr, self.local, self.remote, self.call_id, self.local_cseq,
            self.contact, body,
        )  # fmt: skip
        if self.route_set:
            request.route = list(self.route_set)
        return request


def new_request(
    method: str,
    uri: URI,
    local_addr: Addr,
    from_: Address,
    to: Address,
    call_id: str,
    seq: int,
    contact: URI,
    body: bytes = b"",
) -> Request:
    """A request from us (RFC 3261 8.1.1): a fresh Via branch, our Contact and User-Agent."""
    request = Request(method, uri, body)
    host, port = local_addr
    request.via = [
        Via(transport="UDP", host=host, port=port, parameters=Parameters(branch=new_branch(), rport=None))
    ]
    request.headers.set("Max-Forwards", "70")
    request.from_address = from_
    request.to_address = to
    request.headers.set("Call-ID", call_id)
    request.cseq = CSeq(sequence=seq, method=method)
    request.contact = [Address(uri=contact)]
    request.headers.set("User-Agent", USER_AGENT)
    return request
