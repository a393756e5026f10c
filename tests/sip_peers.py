"""sipp (scripted SIP scenarios) and kamailio (a registrar and proxy with digest auth) on
127.0.0.1, for the SIP tests; baresip and the shared helpers are in sip_support.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from subprocess import DEVNULL, PIPE

from sip_support import (
    DTMF_1_PCAP,
    LOCALHOST,
    free_udp_port,
    free_udp_range,
    need_binary,
    read_text,
    sip_ping,
)


@dataclass
class SippResult:
    rc: int | None  # 0: every call passed; 1: some failed; None: killed at the timeout
    stdout: str
    stderr: str  # why a call was aborted
    errors: str  # -trace_err: unexpected messages
    stats: str  # -trace_stat CSV
    messages: str  # -trace_msg: every SIP message sent and received

    def explain(self) -> str:
        return f"sipp rc={self.rc}\n{self.stderr}\n--- errors\n{self.errors}\n--- messages\n{self.messages[-6000:]}"


class Sipp:
    """Runs sipp scenarios (XML text) as a UAC against a target "host:port"; files under `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.dir, self.count = workdir, 0

    async def run(
        self, scenario: str, target: str, *, service: str = "bob", timeout: float = 30
    ) -> SippResult:
        exe = need_binary("sipp")
        self.count += 1
        files = {k: self.dir / f"sipp-{self.count}.{k}" for k in ("xml", "errors", "stats", "messages")}
        files["xml"].write_text(scenario)
        media = str(free_udp_range(4)[0])  # even; sipp binds -mp and -mp + 2 (video)
        cmd = [exe, target, "-sf", str(files["xml"]), "-s", service, "-m", "1", "-nostdin", "-i", LOCALHOST]
        cmd += ["-p", str(free_udp_port()), "-mi", LOCALHOST, "-mp", media, "-trace_err", "-trace_stat"]
        cmd += ["-trace_msg", "-error_file", str(files["errors"]), "-stf", str(files["stats"])]
        cmd += ["-message_file", str(files["messages"]), "-timeout", f"{int(timeout)}s", "-timeout_error"]
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=DEVNULL, stdout=PIPE, stderr=PIPE)
        rc: int | None = None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout + 5)
            rc = proc.returncode
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
        logs = [read_text(files[k]) for k in ("errors", "stats", "messages")]
        return SippResult(rc, out.decode(errors="replace"), err.decode(errors="replace"), *logs)


def _send(method: str, cseq: int, branch: str = "[branch]", to_tag: bool = False, sdp: bool = False) -> str:
    """A request in a sipp <send>; sipp fills the [keywords] and fixes the line ends."""
    ruri = "sip:" + ("" if method == "OPTIONS" else "[service]@") + "[remote_ip]:[remote_port]"
    body = "Content-Length: 0\n"
    if sdp:
        body = f"Content-Type: application/sdp\n      Content-Length: [len]\n\n{_SDP}"
    return f"""  <send{"" if method == "ACK" else ' retrans="500"'}><![CDATA[
      {method} {ruri} SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch={branch}
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>{"[peer_tag_param]" if to_tag else ""}
      Call-ID: [call_id]
      CSeq: {cseq} {method}
      Contact: <sip:sipp@[local_ip]:[local_port]>
      Max-Forwards: 70
      {body}
  ]]></send>
"""


def _recv(*codes: int, optional: tuple[int, ...] = ()) -> str:
    return "".join(f'  <recv response="{c}" optional="true"/>\n' for c in optional) + "".join(
        f'  <recv response="{c}"/>\n' for c in codes
    )


def _scenario(name: str, *parts: str) -> str:
    return f'<?xml version="1.0" encoding="ISO-8859-1" ?>\n<scenario name="{name}">\n{"".join(parts)}</scenario>\n'


# [media_port], not [rtpstream_audio_port]: then rtp_stream audio and play_pcap_audio DTMF both
# leave from that port (a pcap played without it goes out from port 0).
_SDP = """      v=0
      o=sipp 1 1 IN IP4 [local_ip]
      s=-
      c=IN IP4 [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0 101
      a=rtpmap:0 PCMU/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-15
"""


def options_scenario(expect: int = 200) -> str:
    """One OPTIONS to the server itself (no user part); passes when the reply is `expect`."""
    return _scenario("options", _send("OPTIONS", 1), _recv(expect))


def cancel_scenario(ring_ms: int = 500) -> str:
    """INVITE; on 180, CANCEL `ring_ms` later; expect 200 (CANCEL) and 487 (INVITE); ACK. The
    CANCEL and that ACK must carry the INVITE's branch, hence a fixed one."""
    branch = "z9hG4bK-[pid]-[call_number]-invite"
    return _scenario(
        "cancel",
        _send("INVITE", 1, branch=branch, sdp=True),
        _recv(180, optional=(100,)),
        f'  <pause milliseconds="{ring_ms}"/>\n',
        _send("CANCEL", 1, branch=branch),
        _recv(200, 487),
        _send("ACK", 1, branch=branch, to_tag=True),
    )


def audio_dtmf_scenario(ulaw: Path, audio_ms: int, dtmf_pcap: Path = DTMF_1_PCAP, hold_ms: int = 1000) -> str:
    """INVITE offering PCMU and telephone-event/8000 (pt 101); ACK; stream `ulaw` (headerless mu-law)
    for `audio_ms`; pause it; play the RFC 4733 digit in `dtmf_pcap` (its own SSRC, same port; "1"
    by default); BYE `hold_ms` later. The pause keeps the two streams from interleaving."""
    return _scenario(
        "audio-dtmf",
        _send("INVITE", 1, sdp=True),
        _recv(200, optional=(100, 180, 183)),
        _send("ACK", 1, to_tag=True),
        f'  <nop><action><exec rtp_stream="{ulaw},1,0"/></action></nop>\n  <pause milliseconds="{audio_ms}"/>\n',
        '  <nop><action><exec rtp_stream="pause"/></action></nop>\n',
        f'  <nop><action><exec play_pcap_audio="{dtmf_pcap}"/></action></nop>\n  <pause milliseconds="{hold_ms}"/>\n',
        _send("BYE", 2, to_tag=True),
        _recv(200),
    )


_KAMAILIO_CFG = """#!KAMAILIO
debug=2
log_stderror=yes
children=2
disable_tcp=yes
auto_aliases=no
listen=udp:{address}
alias={address}
mpath="{mpath}/"
{modules}
modparam("usrloc", "db_mode", 0)
modparam("registrar", "min_expires", 5)
modparam("htable", "htable", "users=>size=4;")

event_route[htable:mod-init] {{
{users}
}}

request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (!sanity_check("17895", "7")) {{ exit; }}
    xlog("L_INFO", "presence-test: $rm $ru from $fu\\n");
    if (is_method("OPTIONS") && uri == myself && $rU == $null) {{ sl_send_reply("200", "OK"); exit; }}
    if (is_method("REGISTER")) {{  # before has_totag(); a wrong password or unknown user gets 403
        if ($sht(users=>$tU) == $null) {{ sl_send_reply("403", "Forbidden"); exit; }}
        $var(rc) = pv_www_authenticate("{realm}", "$sht(users=>$tU)", "0");
        if ($var(rc) == -2) {{ sl_send_reply("403", "Forbidden"); exit; }}
        if ($var(rc) < 0) {{ www_challenge("{realm}", "0"); exit; }}
        consume_credentials();
        if (!save("location")) {{ sl_reply_error(); }}
        exit;
    }}
    if (has_totag()) {{
        if (loose_route()) {{ t_relay(); exit; }}
        if (is_method("ACK") && t_check_trans()) {{ t_relay(); }}
        exit;
    }}
    if (is_method("CANCEL")) {{ if (t_check_trans()) {{ t_relay(); }} exit; }}
    t_check_trans();
    if ({auth_calls} && is_method("INVITE")) {{
        if ($sht(users=>$fU) == $null) {{ sl_send_reply("403", "Forbidden"); exit; }}
        $var(rc) = pv_proxy_authenticate("{realm}", "$sht(users=>$fU)", "0");
        if ($var(rc) == -2) {{ sl_send_reply("403", "Forbidden"); exit; }}
        if ($var(rc) < 0) {{ proxy_challenge("{realm}", "0"); exit; }}
        consume_credentials();
    }}
    record_route();
    if (uri == myself && !lookup("location")) {{ sl_send_reply("404", "Not Found"); exit; }}
    t_relay();
}}
"""


class Kamailio:
    """Registrar and proxy on 127.0.0.1 with digest auth for `users` (name -> password): REGISTER gets
    401 then 200 (403 for a wrong password or unknown user); INVITEs from users must answer a 407
    unless auth_calls=False; requests for a registered user go to its contact. Stopped by PID."""

    realm = "presence.test"
    modules = "corex tm sl rr pv maxfwd textops siputils xlog sanity usrloc registrar auth htable"

    def __init__(self, workdir: Path, users: dict[str, str], *, auth_calls: bool = True) -> None:
        self.dir, self.users, self.auth_calls = workdir / "kamailio", users, auth_calls
        self.port = free_udp_port()
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        """host:port, e.g. for SipAccount.registrar."""
        return f"{LOCALHOST}:{self.port}"

    def config(self) -> str:
        mpaths = [*Path("/usr/lib").glob("*/kamailio/modules"), Path("/usr/lib/kamailio/modules")]
        return _KAMAILIO_CFG.format(
            address=self.address,
            mpath=next((p for p in mpaths if p.is_dir()), mpaths[-1]),
            modules="\n".join(f'loadmodule "{m}.so"' for m in self.modules.split()),
            users="\n".join(f'    $sht(users=>{name}) = "{pw}";' for name, pw in self.users.items()),
            realm=self.realm,
            auth_calls="true" if self.auth_calls else "false",
        )

    def log(self) -> str:
        return read_text(self.dir / "kamailio.log")

    async def __aenter__(self) -> Kamailio:
        exe = need_binary("kamailio")
        run = self.dir / "run"
        run.mkdir(parents=True, exist_ok=True)
        (self.dir / "kamailio.cfg").write_text(self.config())
        cmd = [exe, "-DD", "-E", "-f", str(self.dir / "kamailio.cfg"), "-P", str(run / "kamailio.pid")]
        with (self.dir / "kamailio.log").open("wb") as log:  # a file: nobody would drain a pipe
            cmd += ["-Y", str(run), "-m", "32", "-M", "4"]
            self._proc = await asyncio.create_subprocess_exec(*cmd, stdin=DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while await sip_ping(self.port, timeout=0.2) is None:  # it answers after ~0.12 s
            if self._proc.returncode is not None or time.monotonic() > deadline:
                await self.stop()
                raise AssertionError(f"kamailio did not answer OPTIONS:\n{self.log()[-4000:]}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """SIGTERM to the main process, by its PID file once written; it ends its children."""
        if not self._proc or self._proc.returncode is not None:
            return
        pidfile = self.dir / "run" / "kamailio.pid"
        pid = int(pidfile.read_text()) if pidfile.exists() and pidfile.read_text().strip() else self._proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), 5)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()


def hold_scenario(hold_ms: int = 500) -> str:
    """INVITE; ACK; re-INVITE with a=sendonly (hold), the answer must say recvonly; ACK;
    re-INVITE with sendrecv (resume), the answer must say sendrecv; ACK; BYE."""

    def answer_says(direction: str) -> str:
        return (
            '  <recv response="200">\n    <action>\n'
            f'      <ereg regexp="a={direction}" search_in="body" check_it="true" assign_to="dir_{direction}"/>\n'
            "    </action>\n  </recv>\n"
            f'  <Reference variables="dir_{direction}"/>\n'
        )

    held = _send("INVITE", 2, to_tag=True, sdp=True).replace(
        "a=fmtp:101 0-15\n", "a=fmtp:101 0-15\n      a=sendonly\n"
    )
    return _scenario(
        "hold",
        _send("INVITE", 1, sdp=True),
        _recv(200, optional=(100, 180)),
        _send("ACK", 1, to_tag=True),
        f'  <pause milliseconds="{hold_ms}"/>\n',
        held,
        _recv(optional=(100,)),
        answer_says("recvonly"),
        _send("ACK", 2, to_tag=True),
        f'  <pause milliseconds="{hold_ms}"/>\n',
        _send("INVITE", 3, to_tag=True, sdp=True),
        _recv(optional=(100,)),
        answer_says("sendrecv"),
        _send("ACK", 3, to_tag=True),
        _send("BYE", 4, to_tag=True),
        _recv(200),
    )


def silent_caller_scenario(wait_ms: int = 20_000) -> str:
    """INVITE and ACK, then no RTP at all (a phone that lost its network): the far end must
    send BYE within `wait_ms`; answered 200."""
    return _scenario(
        "silent",
        _send("INVITE", 1, sdp=True),
        _recv(200, optional=(100, 180)),
        _send("ACK", 1, to_tag=True),
        f'  <recv request="BYE" timeout="{wait_ms}"/>\n',
        """  <send><![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
  ]]></send>
""",
    )
