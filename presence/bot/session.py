"""A call session: one room, its peers (one per human participant), one engine, one voice.

Each peer holds a ``PeerLink``: an aiortc ``RTCPeerConnection`` for a browser or WHIP client,
a SIP dialog with its RTP for a phone. Their audio feeds the session's micro-turn assembler,
WebRTC video is sampled into it, and every link receives the call's events.
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

import numpy as np
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import SessionDescription

from presence.bot.backends.factory import Backends
from presence.bot.engine import Engine
from presence.bot.jobs.bridge import JobBridge
from presence.bot.manners import CallManners, Manner, MannerOptions
from presence.bot.meeting import MeetingLog
from presence.bot.policy import build_policy
from presence.bot.room_audio import RoomAudio
from presence.bot.transfer import SAY_FAILED, SAY_TRANSFER, wants_a_person
from presence.clock import now
from presence.config import Settings
from presence.events import Ev, EventLog
from presence.media.echo import ECHO_TRANSPORTS, EchoStage, ReferenceBuffer, echo_wanted
from presence.media.inbound import AudioReader, VideoReader
from presence.media.microturn import MicroTurnAssembler
from presence.media.mix import VoiceQueue
from presence.media.opus_plc import configure_receiver, configure_sender
from presence.media.speech import SpeechTrack
from presence.seams import CallEvent, VideoFrame
from presence.signaling.contract import PLAIN, Answer, CallRejected, JoinOptions, PeerLink
from presence.signaling.metrics import Metrics
from presence.signaling.rtc import RtcLink, new_peer_connection

log = logging.getLogger(__name__)


@dataclass
class Peer:
    id: str
    participant: str
    link: PeerLink
    created: float = field(default_factory=now)
    audio: AudioReader | None = None
    video: VideoReader | None = None
    mix: VoiceQueue | None = None  # their voice in the room's mixes (rooms the bot hosts)

    def last_heard(self) -> float:
        """When the participant last sent audio: media off the network (a busy machine may
        decode it seconds later, and the peer must not be taken for gone meanwhile), else a frame."""
        frame = self.audio.last_frame_at if self.audio is not None else self.created
        return max(frame, self.link.last_heard())


def _one_track_of_each_kind(pc: RTCPeerConnection) -> None:
    """Answer every audio or video section after the first of its kind inactive: the bot reads
    one track of each kind, and aiortc would queue an unread track's frames without bound.
    (Signaling lets one such section through: the screen-share video of a SmallWebRTC client.)"""
    seen: set[str] = set()
    for transceiver in pc.getTransceivers():
        if transceiver.kind in seen:
            transceiver.direction = "inactive"
        seen.add(transceiver.kind)


def _ice_credentials(sdp: str) -> set[tuple[str | None, str | None]]:
    return {(m.ice.usernameFragment, m.ice.password) for m in SessionDescription.parse(sdp).media}


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
        # Echo cancellation, per peer (echo_cancel=auto: phone-style transports only); the
        # reference of what the bot sent is kept once a call could need it.
        could = settings.echo_cancel == "on" or (settings.echo_cancel == "auto" and bool(ECHO_TRANSPORTS))
        self.echo_reference = ReferenceBuffer() if backends.echo_factory is not None and could else None
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
        self._manner_task: asyncio.Task[None] | None = None
        self._transfer_task: asyncio.Task[None] | None = None
        self._removing: set[str] = set()
        # A meeting on an SFU lives until its connector leaves, even with nobody in it for a
        # while (everyone stepped out, the SFU restarted): its transcript and context stay.
        self.persistent = False
        self.meeting: MeetingLog | None = None
        self._room_audio: RoomAudio | None = None
        self.events.listen(self._forward)
        self.events.listen(self._on_call_event)
        self.engine.keys_taken = self._keys_taken

    # ------------------------------------------------------------------ peers
    async def add_peer(self, sdp: str, participant: str, options: JoinOptions = PLAIN) -> Answer:
        self._check_room(options)
        s = self.settings
        pc = new_peer_connection(s.ice_servers, s.ice_host_addresses)
        link = RtcLink(pc)
        peer = self._new_peer(link, participant, options)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio" and link.audio is None:
                link.audio = track
            self._attach_track(peer, track)

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            link.channels.append(channel)

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
            _one_track_of_each_kind(pc)
            for transceiver in pc.getTransceivers():
                if transceiver.kind == "audio":
                    buffer = configure_receiver(
                        transceiver.receiver, s.rx_prefetch_packets, conceal=s.opus_plc
                    )
                    link.rx_buffer = link.rx_buffer or buffer
            link.play(self._voice_for(peer))
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
        await self._joined(peer)
        return Answer(call_id=self.call_id, peer_id=peer.id, sdp=pc.localDescription.sdp)

    def peer_connection(self, peer_id: str) -> RTCPeerConnection | None:
        """A live WebRTC peer's connection; None for another transport or a peer that is gone."""
        peer = self.peers.get(peer_id)
        if peer is None or peer_id in self._removing or not isinstance(peer.link, RtcLink):
            return None
        return peer.link.pc

    async def renegotiate(self, peer_id: str, sdp: str) -> Answer:
        """Answer a new offer on a peer's own connection (a SmallWebRTC client re-offering with
        its pc_id): its tracks and the call go on. aiortc cannot restart ICE on a connection, so
        an offer with new ICE credentials is refused (409): the client re-offers with restart_pc."""
        pc = self.peer_connection(peer_id)
        if pc is None or pc.remoteDescription is None:
            raise CallRejected(404, "unknown_peer", "no such peer connection (or it has hung up)")
        if _ice_credentials(sdp) != _ice_credentials(pc.remoteDescription.sdp):
            raise CallRejected(
                409,
                "ice_restart_not_supported",
                "this offer restarts ICE, which the bot cannot do on a live connection: "
                "send a new peer connection's offer with restart_pc true instead",
            )
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            _one_track_of_each_kind(pc)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            raise CallRejected(400, "bad_offer", f"cannot renegotiate with this offer: {exc}") from exc
        return Answer(call_id=self.call_id, peer_id=peer_id, sdp=pc.localDescription.sdp)

    async def add_link(self, link: PeerLink, participant: str, options: JoinOptions = PLAIN) -> str:
        """Add a participant whose transport is already connected (a SIP call after its
        INVITE, a provider's media stream); returns the peer id."""
        self._check_room(options)
        peer = self._new_peer(link, participant, options)
        link.on_dtmf = lambda digit, t: self.engine.on_dtmf(peer.participant, digit, t)
        if link.audio is not None:
            self._attach_track(peer, link.audio)
        link.play(self._voice_for(peer))
        await self._joined(peer)
        self._on_connected(peer)  # connected already: the caller hears the greeting now
        return peer.id

    def voice(self) -> MediaStreamTrack:
        """The bot's voice for one more listener (a peer, an SFU publisher)."""
        return self.relay.subscribe(self.track, buffered=False)

    def _voice_for(self, peer: Peer) -> MediaStreamTrack:
        """What one participant hears: in a room, their own mix (the others and the bot)."""
        return self.room_audio.listen(peer.participant) if peer.mix is not None else self.voice()

    @property
    def room_audio(self) -> RoomAudio:
        """The room's mixes and interpreter (rooms the bot hosts; not on an SFU)."""
        if self._room_audio is None:
            self._room_audio = RoomAudio(
                self.settings, self.backends.languages, self.events, self.track, self.engine
            )
        return self._room_audio

    @property
    def mixes(self) -> bool:
        return self.room is not None and not self.persistent and self.settings.room_mix_max_peers > 0

    def _check_room(self, options: JoinOptions = PLAIN) -> None:
        """CallRejected when the call is over or full. The caller adds its peer with no await
        in between (``_new_peer``): concurrent joins cannot overfill the room."""
        if self.closed:
            raise CallRejected(409, "call_ended", "this call has ended")
        cap = self.room_audio.cap if self.mixes else self.settings.max_peers_per_room
        if len(self.peers) >= cap:
            raise CallRejected(409, "room_full", f"this room is full: at most {cap} participants")
        if options.language is not None:
            if not self.mixes:
                raise CallRejected(
                    400,
                    "interpreter_needs_a_room",
                    "an interpreter serves a room: join one (room) to declare a language",
                )
            self.room_audio.admit(options)

    def _new_peer(self, link: PeerLink, participant: str, options: JoinOptions = PLAIN) -> Peer:
        peer = Peer(id=uuid.uuid4().hex[:16], participant=self._unique_name(participant), link=link)
        self.peers[peer.id] = peer
        if self.mixes:
            peer.mix = self.room_audio.add(peer.participant, options)
        return peer

    async def _joined(self, peer: Peer) -> None:
        self._start()
        await self._open_jobs()
        # names only: a peer id is its owner's, and events go to everyone in the room
        self.events.emit(Ev.PARTICIPANT_JOINED, participant=peer.participant, transport=peer.link.transport)

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
            wanted = echo_wanted(s.echo_cancel, peer.link.transport)
            if wanted and self.echo_reference is not None and self.backends.echo_factory is not None:
                echo = EchoStage(self.backends.echo_factory(), self.echo_reference)
            peer.audio = AudioReader(
                peer.participant,
                track,
                buffer,
                self.backends.vad_factory(),
                self._on_voice if peer.mix is not None else self.engine.on_voice,
                echo=echo,
                mix=peer.mix,
            )
            peer.audio.start()
        elif track.kind == "video" and peer.video is None:
            # Even with sampling off the track is drained: aiortc queues every decoded frame.
            peer.video = VideoReader(peer.participant, track, s.video_fps, s.video_max_width, self._on_video)
            peer.video.start()

    def _on_voice(self, participant: str, prob: float, t: float, piece: np.ndarray) -> None:
        self.engine.on_voice(participant, prob, t, piece)
        self.room_audio.on_voice(participant, prob, t, piece)

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
            if peer.mix is not None:
                self.room_audio.remove(peer.participant)
            await peer.link.close()
            self.peers.pop(peer_id, None)
            if notify:
                self.events.emit(Ev.PARTICIPANT_LEFT, participant=peer.participant)
        finally:
            self._removing.discard(peer_id)
        if not self.peers and not self.closed and not self.persistent:
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
        """A caller that vanished without hanging up stops sending: let them go. And phone
        manners: a quiet call is checked on and ended, a long one ended (``CallManners``)."""
        timeout = self.settings.peer_timeout_s
        manners = CallManners(MannerOptions.from_settings(self.settings), now())
        # Until the call is closed: removing the last peer closes it from inside this task,
        # which close() cannot cancel, and a loop that went on would keep the session alive.
        while not self.closed:
            await asyncio.sleep(min(1.0, timeout / 4))
            t = now()
            phone = any(p.link.transport != "webrtc" for p in self.peers.values())
            manner = manners.step(
                t, active_at=self.engine.caller.last_voiced, speaking=self.track.speaking, idle_checks=phone
            )
            if manner is not None:
                self._manner_task = asyncio.get_running_loop().create_task(
                    self._mind(manner, manners.o), name=f"manners-{self.call_id}"
                )
            for peer in list(self.peers.values()):
                if t - peer.last_heard() > timeout:
                    log.info("call %s: peer %s silent for %.0f s, removing", self.call_id, peer.id, timeout)
                    await self.remove_peer(peer.id)

    async def _mind(self, manner: Manner, o: MannerOptions) -> None:
        log.info("call %s: %s", self.call_id, manner.value)
        text = {Manner.PROMPT: o.prompt_text, Manner.GOODBYE: o.goodbye_text, Manner.TIME_UP: o.time_up_text}
        await self.engine.say(text[manner])
        if manner is Manner.PROMPT:
            return
        await self._until_said()
        for peer_id in list(self.peers):
            await self.remove_peer(peer_id)

    async def _until_said(self) -> None:
        """Until what the bot is saying has been heard (up to 30 s): before the line goes."""
        await asyncio.sleep(0.2)
        for _ in range(150):
            if not self.track.speaking or self.closed:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.3)  # its last packets in flight

    # ------------------------------------------------------------------ transfer to a person
    def _on_call_event(self, event: CallEvent) -> None:
        d = event.data
        if event.name == Ev.CAPTION and d.get("who") == "caller" and d.get("final"):
            if wants_a_person(str(d.get("text", ""))):
                self._start_transfer()

    def _keys_taken(self, keys: str) -> bool:
        """The key 0 asks for a person (when there is one to transfer to)."""
        return keys.rstrip("#") == "0" and self._start_transfer()

    def _start_transfer(self) -> bool:
        target = self.settings.transfer_to
        links = [p for p in self.peers.values() if p.link.transport == "sip"]
        if not target or not links or self._transfer_task is not None or self.closed:
            return False
        self._transfer_task = asyncio.get_running_loop().create_task(
            self._transfer(links[0], target), name=f"transfer-{self.call_id}"
        )
        return True

    async def _transfer(self, peer: Peer, target: str) -> None:
        await self.engine.say(SAY_TRANSFER)  # cuts a reply the words themselves started
        await self._until_said()
        try:
            moved = await peer.link.transfer(target)
        except Exception:
            log.exception("call %s: transfer to %s failed", self.call_id, target)
            moved = False
        self.events.emit(Ev.TRANSFER, participant=peer.participant, target=target, ok=moved)
        if not moved and not self.closed:
            await self.engine.say(SAY_FAILED)
        self._transfer_task = None

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in (self._manner_task, self._transfer_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        for peer_id in list(self.peers):
            await self.remove_peer(peer_id)
        await self.engine.stop()
        if self._room_audio is not None:
            await self._room_audio.close()
        if self.engine.jobs is not None:
            with contextlib.suppress(Exception):
                await self.engine.jobs.close()
        self.track.stop()

    # ------------------------------------------------------------------ meetings
    def as_meeting(self) -> MeetingLog:
        """This call is a meeting on an SFU: it outlives an empty room, keeps a transcript with
        speaker names, and answers "what did I miss?" from it."""
        self.persistent = True
        if self.meeting is None:
            self.meeting = MeetingLog(self.settings.bot_name)
            self.events.listen(self.meeting.on_event)
            self.engine.answer_from_call = self.meeting.recap
        return self.meeting

    async def meeting_notes(self, timeout: float) -> str:
        """The notes of this meeting; their summary comes from a background ``think`` job
        (up to ``timeout`` seconds), and without one the notes are the transcript alone."""
        meeting = self.meeting or MeetingLog(self.settings.bot_name)
        return await meeting.summarised(self.engine, self.call_id, timeout)

    # ------------------------------------------------------------------ events out
    def _forward(self, event: CallEvent) -> None:
        for peer in list(self.peers.values()):
            try:
                peer.link.on_event(event)
            except Exception:  # one broken link must not keep events from the others
                log.exception("call %s: event to peer %s failed", self.call_id, peer.id)

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
