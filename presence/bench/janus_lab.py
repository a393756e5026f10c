"""A lab for meetings on a real Janus 1.1.2 VideoRoom: the server, and aiortc "humans" in it.

Janus never offers 127.0.0.1 as an ICE candidate (shared/notes/telephony-and-sfu.md), so each
server runs inside a network namespace of its own, joined to ours by a veth pair: Janus on
10.77.N.1 in there, this process (which must still reach Redis on 127.0.0.1) on 10.77.N.2. No
traffic leaves the pair. Needs root, iproute2 and the Debian package ``janus`` (``check_host``
says what is missing). Used by the tests (tests/janus_support.py adds the pytest fixtures) and
by ``presence bench meeting``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from presence.bench.janus_media import RATE, Recording, SmallVideoTrack, VoiceTrack, read_wav
from presence.clock import now
from presence.media.audio import resample, to_float32, to_int16
from presence.signaling.janus.api import LOST, JanusHandle, JanusSession, make_jsep
from presence.signaling.rtc import new_peer_connection, set_audio_prefetch

__all__ = [
    "OPEN_ROOM", "PIN", "PIN_ROOM", "RATE", "JanusHuman", "JanusServer", "Recording", "SmallVideoTrack",
    "Subscription", "VoiceTrack", "check_host", "read_wav", "remove_stale_namespaces",
]  # fmt: skip
log = logging.getLogger(__name__)

JANUS_LIBS = Path("/usr/lib/x86_64-linux-gnu/janus")
PLUGINS = ("audiobridge", "duktape", "echotest", "lua", "nosip", "recordplay", "sip", "streaming")
PLUGINS += ("textroom", "videocall", "voicemail")  # all but videoroom: disabled
TRANSPORTS = ("mqtt", "nanomsg", "pfunix", "rabbitmq", "websockets")  # all but http: disabled
PORT = 8088
OPEN_ROOM, PIN_ROOM, PIN = 1234, 4321, "secret"

_serial = itertools.count()
_live: set[JanusServer] = set()
_NS_NAME = re.compile(r"^pjanus(\d+)x\d+$")


def check_host() -> None:
    """RuntimeError saying why this machine cannot run a ``JanusServer``."""
    if shutil.which("janus") is None:
        raise RuntimeError("janus is not installed (scripts/test.sh installs it with apt-get)")
    if shutil.which("ip") is None:
        raise RuntimeError("iproute2 (ip) is not installed")
    if os.geteuid() != 0:
        raise RuntimeError("a Janus lab creates network namespaces: it needs root")
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    if probe.returncode:
        raise RuntimeError(f"`ip netns` does not work here: {probe.stderr.strip()}")


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", netns, "ip", *args] if netns else ["ip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def _link_exists(name: str) -> bool:
    return re.search(rf"^\d+: {name}@", _ip("-o", "link", "show", check=False).stdout, re.M) is not None


def remove_stale_namespaces() -> None:
    """Namespaces (and their veths) left by a process that was killed before its cleanup."""
    for name in _namespaces():
        if (m := _NS_NAME.match(name)) and not _pid_alive(int(m.group(1))):
            log.warning("removing the stale network namespace %s", name)
            # a Janus that outlived its process (one started where setpriv is missing)
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "delete", name, check=False)
    links = _ip("-o", "link", "show", check=False).stdout
    for link, pid in re.findall(r"^\d+: (pj(\d+)h\d+)@", links, re.M):
        if not _pid_alive(int(pid)):
            _ip("link", "delete", link, check=False)


def _free_subnet() -> int:
    used = {int(n) for n in re.findall(r"inet 10\.77\.(\d+)\.", _ip("-o", "-4", "addr", "show").stdout)}
    used |= {server.subnet for server in _live}
    start = os.getpid() % 200 + 20  # per process: parallel test runs rarely race for one subnet
    for n in itertools.chain(range(start, 250), range(20, start)):
        if n not in used:
            return n
    raise RuntimeError("no free 10.77.N.0/24 subnet")


class JanusServer:
    """Janus in a network namespace of its own: HTTP API and media on ``address`` (10.77.N.1);
    this process reaches it from ``host_address`` (10.77.N.2). Rooms: 1234 (8 publishers, no pin)
    and 4321 (pin "secret", 2 publishers)."""

    def __init__(self, workdir: Path, *, session_timeout: int = 60) -> None:
        k, pid = next(_serial), os.getpid()
        self.netns = f"pjanus{pid}x{k}"
        self.host_if, self.ns_if = f"pj{pid}h{k}", f"pj{pid}n{k}"  # at most 15 characters
        assert len(self.host_if) <= 15, self.host_if
        self.session_timeout = session_timeout
        self.dir = workdir / f"janus-{k}"
        self.log_path = self.dir / "janus.log"
        self.subnet = -1
        self._proc: subprocess.Popen[bytes] | None = None
        self._network = False

    @property
    def address(self) -> str:
        return f"10.77.{self.subnet}.1"

    @property
    def host_address(self) -> str:
        return f"10.77.{self.subnet}.2"

    @property
    def base_url(self) -> str:
        return f"http://{self.address}:{PORT}/janus"

    def url(self, room: int, **query: str) -> str:
        """The room as a meeting URL: janus://10.77.N.1:8088/ROOM[?pin=...&display=...]."""
        tail = urllib.parse.urlencode(query)
        return f"janus://{self.address}:{PORT}/{room}" + (f"?{tail}" if tail else "")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def setup_network(self) -> None:
        """The namespace and the veth pair (``start`` makes them when missing)."""
        self.subnet = _free_subnet()
        _live.add(self)
        self._network = True
        _ip("netns", "add", self.netns)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.netns)
        _ip("link", "set", "lo", "up", netns=self.netns)
        _ip("addr", "add", f"{self.address}/24", "dev", self.ns_if, netns=self.netns)
        _ip("link", "set", self.ns_if, "up", netns=self.netns)
        _ip("addr", "add", f"{self.host_address}/24", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")

    def _write_config(self) -> Path:
        conf = self.dir / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        off = ",".join(f"libjanus_{p}.so" for p in PLUGINS)
        (conf / "janus.jcfg").write_text(
            f"""general: {{
  configs_folder = "{conf}"
  plugins_folder = "{JANUS_LIBS}/plugins"
  transports_folder = "{JANUS_LIBS}/transports"
  events_folder = "{JANUS_LIBS}/events"
  loggers_folder = "{JANUS_LIBS}/loggers"
  debug_level = 4
  interface = "{self.address}"
  session_timeout = {self.session_timeout}
  server_name = "presence-test"
}}
media: {{ rtp_port_range = "20000-20200" }}
nat: {{ ice_enforce_list = "{self.ns_if}" ice_ignore_list = "" ignore_mdns = true }}
plugins: {{ disable = "{off}" }}
transports: {{ disable = "{",".join(f"libjanus_{t}.so" for t in TRANSPORTS)}" }}
loggers: {{ disable = "libjanus_jsonlog.so" }}
events: {{ broadcast = false }}
"""
        )
        (conf / "janus.transport.http.jcfg").write_text(
            f'general: {{ json = "plain" base_path = "/janus" http = true port = {PORT} '
            f'ip = "{self.address}" https = false }}\nadmin: {{ admin_http = false }}\n'
        )
        (conf / "janus.plugin.videoroom.jcfg").write_text(
            "general: { }\n"
            f'room-{OPEN_ROOM}: {{ description = "presence test room" publishers = 8 bitrate = 256000 '
            'audiocodec = "opus" videocodec = "vp8" }\n'
            f'room-{PIN_ROOM}: {{ description = "presence pin room" pin = "{PIN}" publishers = 2 '
            'audiocodec = "opus" videocodec = "vp8" }\n'
        )
        return conf

    def start(self, timeout: float = 10.0) -> None:
        """Start Janus (again, after ``stop``: a fresh server that knows no old session)."""
        assert not self.running, "already running"
        if not self._network:
            self.setup_network()
        conf = self._write_config()
        cmd = ["ip", "netns", "exec", self.netns, "janus", "-C", f"{conf}/janus.jcfg", "-F", str(conf), "-o"]
        if setpriv := shutil.which("setpriv"):  # Janus ends with this process, even one killed by SIGKILL
            cmd = [setpriv, "--pdeathsig", "TERM", *cmd]
        with open(self.log_path, "ab") as out:  # setpriv and `ip netns exec` exec: this PID is Janus'
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.base_url}/info", timeout=0.5) as resp:
                    if resp.status == 200:
                        return
            if not self.running or time.monotonic() > deadline:
                why = (
                    f"exited with {self._proc.returncode}"
                    if not self.running
                    else f"no answer in {timeout} s"
                )
                self.stop()
                raise RuntimeError(f"Janus did not start ({why}); {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (Janus hangs up its peers), SIGKILL when it takes longer than ``timeout``."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def kill(self) -> None:
        """A crash: SIGKILL, no goodbye to anyone."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
            self._proc = None

    def close(self) -> None:
        """Stop Janus and remove the namespace and the veth pair (safe to call twice)."""
        try:
            self.stop()
        finally:
            if self._network:
                _ip("netns", "delete", self.netns, check=False)  # takes the veth pair with it
                if _link_exists(self.host_if):
                    _ip("link", "delete", self.host_if, check=False)
                self._network = False
            _live.discard(self)

    def leftovers(self) -> list[str]:
        """What of this server still exists: its process, namespace or host-side veth."""
        left = [f"pid {self._proc.pid}"] if self.running and self._proc else []
        left += [f"netns {self.netns}"] if self.netns in _namespaces() else []
        left += [f"link {self.host_if}"] if _link_exists(self.host_if) else []
        return left

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> JanusServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _close_all() -> None:  # an interrupted run: no namespace may outlive this process
    for server in list(_live):
        server.close()


class Subscription:
    def __init__(
        self, display: str, feed: int, handle: JanusHandle, pc: RTCPeerConnection, keep_s: float
    ) -> None:
        self.display, self.feed, self.handle, self.pc = display, feed, handle, pc
        self.recording = Recording(keep_s)
        self.webrtcup = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []


class JanusHuman:
    """A person in a VideoRoom, built on aiortc and presence.signaling.janus.api: publishes a
    voice (``say``) and optionally a small video, subscribes to others by display name and
    records what it hears (``heard``). Make one with ``JanusHuman.join``."""

    def __init__(
        self,
        base_url: str,
        room: int,
        display: str,
        *,
        host_address: str,
        pin: str | None = None,
        video: bool = False,
        keep_s: float = 60.0,
        rx_prefetch_packets: int | None = None,  # None: aiortc's jitter buffer as it comes
    ) -> None:
        self.base_url, self.room, self.display, self.pin = base_url, room, display, pin
        self.host_address, self.video, self.keep_s = host_address, video, keep_s
        self.rx_prefetch_packets = rx_prefetch_packets
        self.session: JanusSession | None = None
        self.handle: JanusHandle | None = None
        self.feed_id: int | None = None
        self.pc: RTCPeerConnection | None = None
        self.voice = VoiceTrack()
        self.publishers: dict[int, str] = {}  # feed -> display, as Janus announced them
        self.events: collections.deque[tuple[str, dict[str, Any]]] = collections.deque(maxlen=500)
        self.timings: dict[str, float] = {}  # "join", "subscribe <display>": seconds to webrtcup
        self.subscriptions: dict[str, Subscription] = {}
        self._webrtcup = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._left = False

    @classmethod
    async def join(
        cls, janus: JanusServer, display: str, room: int = OPEN_ROOM, *, publish: bool = True, **kwargs: Any
    ) -> JanusHuman:
        """Join ``room`` as a publisher; with ``publish``, send audio (and video) until webrtcup."""
        human = cls(janus.base_url, room, display, host_address=janus.host_address, **kwargs)
        try:
            await human._join(publish)
        except BaseException:
            await human.leave()
            raise
        return human

    def _pin(self) -> dict[str, str]:
        return {"pin": self.pin} if self.pin is not None else {}

    def _peer(self) -> RTCPeerConnection:
        return new_peer_connection([], [self.host_address])

    async def _join(self, publish: bool) -> None:
        began = time.monotonic()
        self.session = await JanusSession.create(self.base_url)
        self.handle = await self.session.attach("janus.plugin.videoroom")
        self._tasks.append(asyncio.create_task(self._read(self.handle, "publisher", self._webrtcup)))
        body = {"request": "join", "ptype": "publisher", "room": self.room, "display": self.display}
        joined, _ = await self.handle.message({**body, **self._pin()})
        self.feed_id = int(joined["id"])
        self._note_publishers(joined.get("publishers", []))
        if not publish:
            return
        await self.publish()
        self.timings["join"] = time.monotonic() - began

    async def publish(self, timeout: float = 10.0) -> None:
        """Send the voice (and video) to the room; returns at Janus' webrtcup."""
        assert self.handle is not None and self.pc is None
        self.pc = self._peer()
        self.pc.addTrack(self.voice)
        if self.video:
            self.pc.addTrack(SmallVideoTrack())
        await self.pc.setLocalDescription(await self.pc.createOffer())  # gathers every candidate
        body = {"request": "publish", "audio": True, "video": self.video}
        _, answer = await self.handle.message(body, make_jsep("offer", self.pc.localDescription.sdp))
        assert answer is not None, "Janus answered the publish offer without SDP"
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        await asyncio.wait_for(self._webrtcup.wait(), timeout)

    def _note_publishers(self, publishers: list[dict[str, Any]]) -> None:
        for pub in publishers:
            self.publishers[int(pub["id"])] = str(pub.get("display", ""))
        self._changed.set()

    async def _read(self, handle: JanusHandle, label: str, webrtcup: asyncio.Event) -> None:
        while True:
            event = await handle.events.get()
            self.events.append((label, event))
            kind = event.get("janus")
            data = (event.get("plugindata") or {}).get("data") or {}
            if kind == "webrtcup":
                webrtcup.set()
            elif kind == LOST:
                self._changed.set()
                return
            if label == "publisher":
                self._note_publishers(data.get("publishers", []))
                for gone in (data.get("leaving"), data.get("unpublished")):
                    if isinstance(gone, int) and self.publishers.pop(gone, None) is not None:
                        self._changed.set()
            self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        """Until ``predicate()`` holds, re-checked whenever Janus tells this human something."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.display}: {what or predicate} did not happen in {timeout} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.25))

    def feed_of(self, display: str) -> int | None:
        return next((feed for feed, name in self.publishers.items() if name == display), None)

    async def subscribe(self, display: str, timeout: float = 10.0, feed: int | None = None) -> Subscription:
        """Receive ``display``'s feed (waiting until it publishes) and record it; ``feed`` picks
        one of several publishers of that name (a bot's ghost after a failover)."""
        assert self.session is not None, "join first"
        await self.wait_for(lambda: self.feed_of(display) is not None, timeout, f"a publisher {display!r}")
        feed = feed if feed is not None else self.feed_of(display)
        assert feed is not None
        began = time.monotonic()
        handle = await self.session.attach("janus.plugin.videoroom")
        sub = Subscription(display, feed, handle, self._peer(), self.keep_s)
        self.subscriptions[display] = sub
        sub.tasks.append(asyncio.create_task(self._read(handle, f"subscriber {display}", sub.webrtcup)))

        @sub.pc.on("track")
        def _track(track: MediaStreamTrack) -> None:
            sub.tasks.append(asyncio.create_task(self._record(track, sub.recording)))

        body = {"request": "join", "ptype": "subscriber", "room": self.room, "streams": [{"feed": feed}]}
        _, offer = await handle.message({**body, **self._pin()}, timeout=timeout)
        assert offer is not None, "Janus sent no offer to a subscriber"
        await sub.pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], offer["type"]))
        await sub.pc.setLocalDescription(await sub.pc.createAnswer())
        if self.rx_prefetch_packets is not None:
            for transceiver in sub.pc.getTransceivers():
                if transceiver.kind == "audio":
                    set_audio_prefetch(transceiver.receiver, self.rx_prefetch_packets)
        await handle.message({"request": "start"}, make_jsep("answer", sub.pc.localDescription.sdp), timeout)
        await asyncio.wait_for(sub.webrtcup.wait(), timeout)
        self.timings[f"subscribe {display}"] = time.monotonic() - began
        return sub

    @staticmethod
    async def _record(track: MediaStreamTrack, recording: Recording) -> None:
        # Read every track to the end: aiortc queues received frames without bound otherwise.
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if isinstance(frame, av.AudioFrame):
                recording.add(frame, now())
            else:
                recording.video_frames += 1

    def heard(self, display: str) -> np.ndarray:
        """All ``display`` said that reached this human (mono int16, 48 kHz, the last keep_s)."""
        sub = self.subscriptions.get(display)
        return sub.recording.audio() if sub else np.zeros(0, np.int16)

    async def say(self, source: Path | np.ndarray, rate: int = RATE) -> float:
        """Speak a WAV file (or int16 samples at ``rate``); returns once all of it was sent, the
        time it was (``presence.clock.now``)."""
        if isinstance(source, Path):
            pcm, rate = read_wav(source)
        else:
            pcm = np.asarray(source, np.int16)
        if rate != RATE:
            pcm = to_int16(resample(to_float32(pcm), rate, RATE))
        return await self.voice.play(pcm)

    async def leave(self) -> None:
        """Leave the room (idempotent): Janus tells the others this feed is gone."""
        if self._left:
            return
        self._left = True
        self.voice.stop()
        if self.handle is not None and self.session is not None and not self.session.lost.is_set():
            with contextlib.suppress(Exception):
                await self.handle.message({"request": "leave"}, timeout=2.0)
        tasks = [t for sub in self.subscriptions.values() for t in sub.tasks] + self._tasks
        pcs = [sub.pc for sub in self.subscriptions.values()] + ([self.pc] if self.pc else [])
        for pc in pcs:
            await pc.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.destroy()
