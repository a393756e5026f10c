"""Real SIP peers for the SIP tests: baresip (a softphone), sipp (scripted scenarios) and kamailio
(a registrar and proxy with digest auth), all on 127.0.0.1. The settings were measured on Debian
bookworm (shared/notes/telephony-and-sfu.md); tests/test_sip_harness.py checks them. Not a test module."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import shutil
import socket
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from subprocess import DEVNULL, PIPE, STDOUT
from typing import Any

import numpy as np
from conftest import need

LOCALHOST = "127.0.0.1"
BARESIP_MODULES = Path("/usr/lib/baresip/modules")
DTMF_1_PCAP = Path("/usr/share/sip-tester/dtmf_2833_1.pcap")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_handed_out: set[int] = set()  # ports given to a peer that may not have bound them yet


def need_binary(name: str) -> str:
    """The path of a program; skip without it (a failure under CI=true)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")  # kamailio: sbin, off a user PATH
    need(path is not None, f"{name} is not installed (scripts/test.sh installs it with apt-get)")
    return str(path)


def _free_port(kind: int) -> int:
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((LOCALHOST, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def free_udp_port() -> int:
    return _free_port(socket.SOCK_DGRAM)


def free_tcp_port() -> int:
    return _free_port(socket.SOCK_STREAM)


def _udp_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def free_udp_range(count: int = 20) -> tuple[int, int]:
    """(first, last) of a block of free UDP ports starting even (RTP/RTCP pairs), e.g. for baresip's
    rtp_ports; below Linux's ephemeral range, where bind(0) sockets never land."""
    for _ in range(200):
        first = random.randrange(20000, 32000 - count, 2)
        block = range(first, first + count)
        if _handed_out.isdisjoint(block) and all(_udp_bindable(p) for p in block):
            _handed_out.update(block)
            return first, first + count - 1
    raise RuntimeError("no free UDP port range")


def read_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def _run(*cmd: str) -> None:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=PIPE, stderr=STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}): {out.decode(errors='replace')}")


async def speech_wav(text: str, path: Path) -> Path:
    """Spoken text as an 8 kHz mono s16 WAV, what baresip's aufile plays."""
    raw = path.with_suffix(".espeak.wav")
    await _run(need_binary("espeak-ng"), "-w", str(raw), text)
    await _run(need_binary("sox"), str(raw), "-r", "8000", "-c", "1", "-b", "16", str(path))
    return path


async def ulaw_file(wav: Path, path: Path) -> Path:
    """Headerless mu-law for sipp's rtp_stream (it would send a WAV header as audio)."""
    await _run(need_binary("sox"), str(wav), "-r", "8000", "-c", "1", "-t", "ul", str(path))
    return path


async def sip_ping(port: int, host: str = LOCALHOST, timeout: float = 0.3) -> str | None:
    """One OPTIONS over UDP: the reply's status line, or None when none came in time."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Proto, local_addr=(LOCALHOST, 0))
    me, tag = f"{LOCALHOST}:{transport.get_extra_info('sockname')[1]}", f"{random.getrandbits(32):x}"
    msg = (
        f"OPTIONS sip:{host}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{tag};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:ping@{me}>;tag={tag}\r\nTo: <sip:{host}:{port}>\r\n"
        f"Call-ID: {tag}@presence-test\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    try:
        transport.sendto(msg.encode(), (host, port))
        return (await asyncio.wait_for(got, timeout)).split(b"\r\n", 1)[0].decode(errors="replace")
    except TimeoutError:
        return None
    finally:
        transport.close()


@dataclass
class SipAccount:
    """A baresip account. With a registrar ("127.0.0.1:PORT") the AOR's domain is the registrar and
    baresip REGISTERs there; the password answers 401 (REGISTER) and 407 (INVITE) challenges."""

    user: str
    password: str | None = None
    registrar: str | None = None
    outbound: str | None = None  # an outbound proxy URI, e.g. "sip:127.0.0.1:5160"

    def line(self, codecs: str, auto_answer: bool) -> str:
        # baresip reads a bare "G722" as G722/8000/1 and finds no such codec: it registers G722/16000/1
        codecs = ",".join(c + "/16000/1" if c.upper() == "G722" else c for c in codecs.split(","))
        params = [f"regint={600 if self.registrar else 0}", f"audio_codecs={codecs}"]
        params += [f"auth_pass={self.password}"] if self.password is not None else []
        params += [f'outbound="{self.outbound}"'] if self.outbound else []
        params += ["answermode=auto"] if auto_answer else []
        return f"<sip:{self.user}@{self.registrar or LOCALHOST}>;" + ";".join(params)


class Baresip:
    """Headless baresip with its config folder under `workdir`. Says `source` (an 8 kHz mono s16 WAV),
    then `silence_s` of silence, then hangs up (aufile ends the call at the end of its file); with no
    source, 120 s of silence. echo=True sends back what it hears instead. sndfile records what it
    sent and heard. Always stopped on exit."""

    CLOSED = re.compile(r"Call with .* terminated|session closed")
    ESTABLISHED = re.compile(r"Call established")

    def __init__(
        self,
        workdir: Path,
        account: SipAccount,
        *,
        source: Path | None = None,
        silence_s: float = 0.0,
        echo: bool = False,
        codecs: str = "PCMU",
        auto_answer: bool = False,
    ) -> None:
        self.dir = workdir / f"baresip-{account.user}"
        self.account, self.source, self.silence_s, self.echo = account, source, silence_s, echo
        self.codecs, self.auto_answer = codecs, auto_answer
        self.sip_port, self.ctrl_port, self.cons_port = free_udp_port(), free_tcp_port(), free_udp_port()
        self.rtp_ports = free_udp_range()
        self.lines: list[str] = []  # stdout and stderr, split at \r and \n, colours stripped
        self.events: list[dict[str, Any]] = []  # ctrl_tcp events: CALL_ESTABLISHED, REGISTER_OK, ...
        self._proc: asyncio.subprocess.Process | None = None
        self._changed, self._eof = asyncio.Event(), False
        self._tasks: list[asyncio.Task[None]] = []
        self._ctrl: asyncio.StreamWriter | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.sip_port}"

    @property
    def uri(self) -> str:
        """This phone, reached directly (no registrar)."""
        return f"sip:{self.account.user}@{self.address}"

    def config(self) -> str:
        port = self.sip_port
        src = f"aufile,{self.dir / 'source.wav'}"
        play = f"aubridge,sink{port}"
        if self.echo:  # aubridge joins a source and a player of the same device name
            src = play = f"aubridge,echo{port}"
        modules = ["g711.so", "aufile.so", "aubridge.so", "sndfile.so", "ctrl_tcp.so", "cons.so"]
        modules += ["g722.so"] if (BARESIP_MODULES / "g722.so").exists() else []
        return "\n".join(
            [
                f"sip_listen {self.address}\nsip_transports udp\nnet_interface {LOCALHOST}",  # "lo" fails
                f"audio_source {src}\naudio_player {play}",  # not alsa,null: it burns 0.6 core
                f"audio_alert aubridge,alert{port}\nrtp_ports {self.rtp_ports[0]}-{self.rtp_ports[1]}",
                f"module_path {BARESIP_MODULES}",
                *(f"module {m}" for m in modules),
                "module_app account.so\nmodule_app menu.so",  # no stdio.so: it would read the terminal
                f"snd_path {self.dir / 'snd'}",
                f"ctrl_tcp_listen {LOCALHOST}:{self.ctrl_port}\ncons_listen {LOCALHOST}:{self.cons_port}\n",
            ]
        )

    def _write_source(self) -> None:
        # aufile does not resample: the file's rate must be the codec's (G.722: 16 kHz)
        rate = 16000 if self.codecs.upper().startswith("G722") else 8000
        audio = np.zeros(0, np.int16)
        if self.source:
            with wave.open(str(self.source)) as w:
                assert (w.getnchannels(), w.getsampwidth()) == (1, 2), f"{self.source}: not mono s16"
                audio, src_rate = np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate()
            if src_rate != rate:  # linear interpolation is enough for test speech
                at = np.arange(int(len(audio) * rate / src_rate)) * src_rate / rate
                audio = np.interp(at, np.arange(len(audio)), audio).astype(np.int16)
        silence = np.zeros(int(rate * (self.silence_s if self.source else 120)), np.int16)
        with wave.open(str(self.dir / "source.wav"), "wb") as w:
            w.setparams((1, 2, rate, 0, "NONE", "not compressed"))
            w.writeframes(np.concatenate([audio, silence]).astype("<i2").tobytes())

    async def __aenter__(self) -> Baresip:
        exe = need_binary("baresip")
        (self.dir / "snd").mkdir(parents=True, exist_ok=True)
        self._write_source()
        (self.dir / "config").write_text(self.config())
        (self.dir / "accounts").write_text(self.account.line(self.codecs, self.auto_answer) + "\n")
        cmd = [exe, "-f", str(self.dir)]
        self._proc = await asyncio.create_subprocess_exec(*cmd, stdin=DEVNULL, stdout=PIPE, stderr=STDOUT)
        self._tasks.append(asyncio.create_task(self._read_output()))
        deadline = time.monotonic() + 10
        while True:  # ctrl_tcp listens once the modules are loaded
            try:
                reader, self._ctrl = await asyncio.open_connection(LOCALHOST, self.ctrl_port)
                break
            except OSError:
                if self._proc.returncode is not None or time.monotonic() > deadline:
                    await self.stop()
                    raise AssertionError(f"baresip did not start:\n{self.transcript()}") from None
                await asyncio.sleep(0.05)
        self._tasks.append(asyncio.create_task(self._read_ctrl(reader)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """SIGTERM first: baresip then hangs up and closes its WAV dumps. sndfile writes their header
        at close: before it (or after a SIGKILL) Python's wave refuses them."""
        if self._ctrl:
            self._ctrl.close()
        if self._proc and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 3)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read_output(self) -> None:
        assert self._proc and self._proc.stdout
        buf = ""
        while chunk := await self._proc.stdout.read(4096):
            *done, buf = re.split(r"[\r\n]", buf + chunk.decode(errors="replace"))  # status line: \r
            self.lines += [x for x in (_ANSI.sub("", d).strip() for d in done) if x and "bit/s)" not in x]
            self._changed.set()
        self._eof = True
        self._changed.set()

    async def _read_ctrl(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ValueError):
            while True:  # netstrings: LEN ":" JSON ","
                size = int((await reader.readuntil(b":"))[:-1])
                msg = json.loads((await reader.readexactly(size + 1))[:-1])
                if msg.get("event"):
                    self.events.append(msg)
                    self._changed.set()
                elif (fut := self._pending.pop(str(msg.get("token")), None)) and not fut.done():
                    fut.set_result(msg)

    async def command(self, command: str, params: str | None = None, timeout: float = 5) -> dict[str, Any]:
        """One ctrl_tcp command (dial, hangup, accept, ...): its JSON response; raises unless ok."""
        assert self._ctrl, "not started"
        token = f"t{random.getrandbits(32):x}"
        fut = self._pending[token] = asyncio.get_running_loop().create_future()
        body = json.dumps({"command": command, "params": params, "token": token}).encode()
        self._ctrl.write(b"%d:%s," % (len(body), body))
        await self._ctrl.drain()
        resp = await asyncio.wait_for(fut, timeout)
        if not resp.get("ok"):
            raise AssertionError(f"baresip {command} {params}: {resp}\n{self.transcript()}")
        return resp

    async def dial(self, uri: str) -> None:
        await self.command("dial", uri)

    async def hangup(self) -> None:
        await self.command("hangup")

    async def answer(self) -> None:
        await self.command("accept")

    async def send_dtmf(self, digits: str, on_s: float = 0.2, off_s: float = 0.15) -> None:
        """RFC 4733 digits through cons.so. A key starts a digit and its end packets go out only when
        another key arrives, so each digit is followed by KEYCODE_REL (0x04), a key that does nothing else."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for digit in digits:
                s.sendto(digit.encode(), (LOCALHOST, self.cons_port))
                await asyncio.sleep(on_s)
                s.sendto(b"\x04", (LOCALHOST, self.cons_port))
                await asyncio.sleep(off_s)

    async def wait_line(self, pattern: str | re.Pattern[str], timeout: float = 10, start: int = 0) -> str:
        """The first output line from index `start` on that matches; AssertionError with the
        transcript when none comes in time or baresip exits."""
        rx, deadline, seen = re.compile(pattern), time.monotonic() + timeout, start
        while True:
            if hit := next((line for line in self.lines[seen:] if rx.search(line)), None):
                return hit
            seen, left = len(self.lines), deadline - time.monotonic()
            if left <= 0 or self._eof:
                raise AssertionError(f"baresip never printed /{rx.pattern}/:\n{self.transcript()}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def wait_established(self, timeout: float = 10, start: int = 0) -> str:
        return await self.wait_line(self.ESTABLISHED, timeout, start)

    async def wait_call_closed(self, timeout: float = 10, start: int = 0) -> list[str]:
        """Wait until a call ends (either side hung up, or it failed); all lines seen so far."""
        await self.wait_line(self.CLOSED, timeout, start)
        return list(self.lines)

    async def wait_registered(self, timeout: float = 10) -> bool:
        """True on a 200 to REGISTER, False on a final refusal (e.g. 403, or 401 despite credentials)."""
        return " 200 OK" in await self.wait_line(r"\{\d+/UDP/v4\} 200 OK|reg: .* [3-6]\d\d ", timeout)

    def dtmf_received(self) -> str:
        """The digits whose RFC 4733 start arrived. Only starts: baresip's jitter buffer holds a
        digit's end packets until more RTP arrives."""
        return "".join(re.findall(r"received event: '(.)' \(end=0\)", "\n".join(self.lines)))

    def _dump(self, kind: str) -> Path:
        dumps = sorted((self.dir / "snd").glob(f"dump-*-{kind}.wav"), key=lambda p: p.stat().st_mtime)
        assert dumps, f"baresip wrote no {kind} dump:\n{self.transcript()}"
        return dumps[-1]

    def received_wav(self) -> Path:
        """The last call's decoded audio (what this phone heard) at the codec's rate, mono s16;
        readable once that call closed."""
        return self._dump("dec")

    def sent_wav(self) -> Path:
        return self._dump("enc")

    def transcript(self, last: int = 80) -> str:
        rc = self._proc.returncode if self._proc else None
        return f"[{self.dir}, exit {rc}]\n" + "\n".join(self.lines[-last:])
