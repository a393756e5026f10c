"""A call session: one room, its peers (one per human participant), one engine, one voice.

Each peer is an aiortc ``RTCPeerConnection``. Their audio feeds the session's micro-turn
assembler, their video is sampled into it, and their data channels receive the call's events.
The bot's single speech track is fanned out to every peer through a ``MediaRelay``. When the
last peer leaves or goes silent past ``peer_timeout_s``, the session ends and releases
everything it holds: tasks, tracks, peer connections and model state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack

from presence.bot.backends.factory import Backends
from presence.bot.engine import Engine
from presence.bot.jobs.bridge import JobBridge
from presence.bot.policy import build_policy
from presence.clock import now
from presence.config import Settings
from presence.events import Ev, EventLog
from presence.media.echo import EchoStage, ReferenceBuffer, echo_wanted
from presence.media.inbound import AudioReader, VideoReader
from presence.media.microturn import MicroTurnAssembler
from presence.media.opus_plc import LossJitterBuffer, configure_receiver, configure_sender
from presence.media.speech import SpeechTrack
from presence.seams import CallEvent, VideoFrame
from presence.signaling.contract import Answer, CallRejected
from presence.signaling.metrics import Metrics
from presence.signaling.rtc import new_peer_connection

log = logging.getLogger(__name__)


@dataclass
class Peer:
    id: str
    participant: str
    pc: RTCPeerConnection
    created: float = field(default_factory=now)
    audio: AudioReader | None = None
    video: VideoReader | None = None
    channels: list[RTCDataChannel] = field(default_factory=list)
    greeted: bool = False
    rx_buffer: LossJitterBuffer | None = None  # our jitter buffer on the audio receiver

    def last_heard(self) -> float:
        """When the peer last sent audio: a packet off the network (a busy machine may decode
        it seconds later, and the peer must not be taken for gone meanwhile), else a frame."""
        frame = self.audio.last_frame_at if self.audio is not None else self.created
        return max(frame, self.rx_buffer.last_packet_at) if self.rx_buffer is not None else frame


class CallSession:
    def __init__(
        self,
        call_id: str,
        room: str | None,
        settings: Settings,
        backends: Backends,
        metrics: Metrics | None,
        on_empty: Callable[[CallSession], Awaitable[None]],
        jobs: JobBridge | None = None,
    ) -> None:
        self.call_id = call_id
        self.room = room
        self.settings = settings
        self.backends = backends
        self.metrics = metrics
        self.on_empty = on_empty
        self.jobs_bridge = jobs
        self.events = EventLog(call_id)
        self.assembler = MicroTurnAssembler(
            call_id, settings.micro_turn_ms, settings.max_playout_ms, settings.vad_threshold
        )
        # Echo cancellation: every peer is WebRTC today, so echo_cancel=auto leaves it off.
        self.echo_reference = (
            ReferenceBuffer()
            if backends.echo_factory is not None and echo_wanted(settings.echo_cancel, "webrtc")
            else None
        )
        self.track = SpeechTrack(self.events.emit, self.assembler.bot, self.echo_reference)
        self.relay = MediaRelay()
        self.engine = Engine(
            call_id,
            settings,
            backends,
            build_policy(settings, call_id),
            self.assembler,
            self.track,
            self.events,
            on_step=self._observe_step,
            on_latency=self._observe_latency,
        )
        self.peers: dict[str, Peer] = {}
        self.closed = False
        self._started = False
        self._greeted = False
        self._watchdog: asyncio.Task[None] | None = None
        self._removing: set[str] = set()
        self.events.listen(self._forward)

    # ------------------------------------------------------------------ peers
    async def add_peer(self, sdp: str, participant: str) -> Answer:
        if self.closed:
            raise CallRejected(409, "call_ended", "this call has ended")
        s = self.settings
        # checked and the peer added below with no await in between: concurrent offers cannot overfill
        if len(self.peers) >= s.max_peers_per_room:
            raise CallRejected(
                409, "room_full", f"this room is full: at most {s.max_peers_per_room} participants"
            )
        pc = new_peer_connection(s.ice_servers, s.ice_host_addresses)
        peer = Peer(id=uuid.uuid4().hex[:16], participant=self._unique_name(participant), pc=pc)
        self.peers[peer.id] = peer

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._attach_track(peer, track)

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            peer.channels.append(channel)

            @channel.on("message")
            def on_message(message: object) -> None:
                # The page may send pings; anything else is ignored, never trusted.
                if isinstance(message, str) and len(message) < 1024 and '"ping"' in message:
                    with contextlib.suppress(Exception):
                        channel.send(json.dumps({"type": "pong", "t": now()}))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("call %s peer %s: %s", self.call_id, peer.id, pc.connectionState)
            if pc.connectionState == "connected":
                self._on_connected(peer)
            elif pc.connectionState in ("failed", "closed"):
                await self.remove_peer(peer.id)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            kinds = [t.kind for t in pc.getTransceivers()]
            if "audio" not in kinds:
                raise CallRejected(400, "no_audio", "the offer has no audio media section")
            for transceiver in pc.getTransceivers():
                if transceiver.kind == "audio":
                    buffer = configure_receiver(
                        transceiver.receiver, s.rx_prefetch_packets, conceal=s.opus_plc
                    )
                    peer.rx_buffer = peer.rx_buffer or buffer
            pc.addTrack(self.relay.subscribe(self.track, buffered=False))
            await pc.setLocalDescription(await pc.createAnswer())
            for transceiver in pc.getTransceivers():
                if transceiver.kind == "audio":
                    configure_sender(transceiver, s.opus_fec_loss_pct)
        except CallRejected:
            await self.remove_peer(peer.id, notify=False)
            raise
        except Exception as exc:
            await self.remove_peer(peer.id, notify=False)
            raise CallRejected(400, "bad_offer", f"cannot answer this offer: {exc}") from exc
        self._start()
        await self._open_jobs()
        # names only: a peer id is its owner's, and events go to everyone in the room
        self.events.emit(Ev.PARTICIPANT_JOINED, participant=peer.participant)
        return Answer(call_id=self.call_id, peer_id=peer.id, sdp=pc.localDescription.sdp)

    def _unique_name(self, wanted: str) -> str:
        taken = {p.participant for p in self.peers.values()}
        name, n = (wanted or "caller"), 2
        while name in taken:
            name, n = f"{wanted}-{n}", n + 1
        return name

    def _attach_track(self, peer: Peer, track: MediaStreamTrack) -> None:
        s = self.settings
        if track.kind == "audio" and peer.audio is None:
            buffer = self.assembler.add_participant(peer.participant)
            echo = None
            if self.echo_reference is not None and self.backends.echo_factory is not None:
                echo = EchoStage(self.backends.echo_factory(), self.echo_reference)
            peer.audio = AudioReader(
                peer.participant, track, buffer, self.backends.vad_factory(), self.engine.on_voice, echo=echo
            )
            peer.audio.start()
        elif track.kind == "video" and peer.video is None:
            # Even with sampling off the track is drained: aiortc queues every decoded frame.
            peer.video = VideoReader(peer.participant, track, s.video_fps, s.video_max_width, self._on_video)
            peer.video.start()

    def _on_video(self, frame: VideoFrame) -> None:
        self.assembler.add_video(frame)
        self.events.emit(
            Ev.VIDEO_FRAME, frame.t, participant=frame.participant, width=frame.width, height=frame.height
        )

    def _on_connected(self, peer: Peer) -> None:
        if not self._greeted and self.settings.greeting:
            self._greeted = True
            asyncio.get_running_loop().create_task(self.engine.say(self.settings.greeting))

    async def remove_peer(self, peer_id: str, *, notify: bool = True) -> bool:
        peer = self.peers.get(peer_id)
        if peer is None or peer_id in self._removing:
            return False
        self._removing.add(peer_id)
        try:
            for reader in (peer.audio, peer.video):
                if reader is not None:
                    await reader.stop()
            self.assembler.remove_participant(peer.participant)
            self.engine.remove_participant(peer.participant)
            await peer.pc.close()
            self.peers.pop(peer_id, None)
            if notify:
                self.events.emit(Ev.PARTICIPANT_LEFT, participant=peer.participant)
        finally:
            self._removing.discard(peer_id)
        if not self.peers and not self.closed:
            await self.on_empty(self)
        return True

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self.engine.start()
        self._watchdog = asyncio.get_running_loop().create_task(
            self._watch(), name=f"watchdog-{self.call_id}"
        )

    async def _open_jobs(self) -> None:
        if self.jobs_bridge is None or self.engine.jobs is not None:
            return
        try:
            jobs = await self.jobs_bridge.open_call(self.call_id, self.engine.on_job_result)
        except Exception as exc:  # Redis away: the call goes on without background jobs
            log.warning("call %s: background jobs unavailable: %s", self.call_id, exc)
            return
        jobs.on_change(lambda job: self.events.emit(Ev.JOB, **job))
        self.engine.jobs = jobs

    async def _watch(self) -> None:
        """A caller that vanished without hanging up stops sending: let them go."""
        timeout = self.settings.peer_timeout_s
        # Until the call is closed: removing the last peer closes it from inside this task,
        # which close() cannot cancel, and a loop that went on would keep the session alive.
        while not self.closed:
            await asyncio.sleep(min(1.0, timeout / 4))
            t = now()
            for peer in list(self.peers.values()):
                if t - peer.last_heard() > timeout:
                    log.info("call %s: peer %s silent for %.0f s, removing", self.call_id, peer.id, timeout)
                    await self.remove_peer(peer.id)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        for peer_id in list(self.peers):
            await self.remove_peer(peer_id)
        await self.engine.stop()
        if self.engine.jobs is not None:
            with contextlib.suppress(Exception):
                await self.engine.jobs.close()
        self.track.stop()

    # ------------------------------------------------------------------ events out
    def _forward(self, event: CallEvent) -> None:
        payload: str | None = None
        for peer in self.peers.values():
            for channel in peer.channels:
                if channel.readyState != "open":
                    continue
                if payload is None:
                    payload = json.dumps(event.to_json(), default=str)
                # A page that stops reading must not grow our memory without bound.
                if channel.bufferedAmount < 1_000_000:
                    channel.send(payload)

    def _observe_step(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.microturn_step.observe(seconds)
            self.metrics.microturns.inc()

    def _observe_latency(self, name: str, seconds: float) -> None:
        if self.metrics is None:
            return
        if name == "voice_to_voice":
            self.metrics.voice_to_voice.observe(seconds)
        elif name == "barge_in_stop":
            self.metrics.barge_in_stop.observe(seconds)
