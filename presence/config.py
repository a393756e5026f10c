"""One typed settings object, read from the environment (``PRESENCE_*``) and the command line.

Every field has a default that runs offline on a CPU. The CLI flags are generated from the
fields, so a setting is declared once: ``eot_silence_ms`` is ``PRESENCE_EOT_SILENCE_MS`` and
``--eot-silence-ms``. The CLI wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "PRESENCE_"


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, secret: bool = False) -> Any:
    meta = {"help": help, "choices": choices, "secret": secret}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Settings:
    # --- server and signaling
    host: str = _opt("127.0.0.1", "address the HTTP server binds")
    port: int = _opt(8080, "HTTP port (0 picks a free one)")
    public_url: str = _opt(
        "", "URL the server is reached at, used in printed links (default: from host/port)"
    )
    max_body_bytes: int = _opt(64 * 1024, "largest accepted SDP/JSON body in bytes")
    max_calls: int = _opt(32, "concurrent calls accepted before answering 503")
    token_secret: str = _opt(
        "", "HMAC secret for join tokens; empty = dev mode (no token needed)", secret=True
    )
    token_ttl_s: int = _opt(3600, "lifetime of tokens the server mints, in seconds")
    insecure_dev: bool = _opt(
        False,
        "allow listening on a non-loopback address without token_secret (anyone who reaches the "
        "port can call the bot and queue background jobs): development only",
    )
    max_peers_per_room: int = _opt(
        8, "participants one room takes; the next one's offer is refused with 409 room_full"
    )
    offer_rate_per_min: float = _opt(
        30.0, "offers accepted per minute from one client address, after a burst (0 = no limit); over it: 429"
    )
    offer_burst: int = _opt(
        10, "offers one client address may send at once before offer_rate_per_min applies"
    )
    # --- SIP (phones, PBXs, SIP trunks)
    sip_port: int = _opt(-1, "UDP port for SIP calls (5060 is SIP's own; 0 picks a free one; -1 = no SIP)")
    sip_host: str = _opt("", "address the SIP and RTP sockets bind and announce (default: host)")
    sip_user: str = _opt("presence", "the user part of the bot's SIP address (sip:USER@HOST:PORT)")
    sip_rtp_ports: str = _opt("20000-20999", "UDP ports for the RTP of SIP calls (one per call)")
    sip_codecs: list[str] = _opt(
        ["G722", "opus", "PCMU", "PCMA"], "codecs a SIP call may use, the most wanted first"
    )
    sip_answer_after_ms: int = _opt(
        0, "ring this long (180 Ringing) before answering a SIP call; 0 answers at once"
    )
    sip_registrar: str = _opt(
        "", "SIP registrar to register the bot with (sip:HOST[:PORT]); calls then come through it"
    )
    sip_username: str = _opt(
        "", "user name for the registrar and for dial-out authentication (default: sip_user)"
    )
    sip_password: str = _opt("", "password for digest authentication at the registrar or proxy", secret=True)
    sip_register_expires_s: int = _opt(
        300, "registration lifetime asked for; renewed at 80 percent of what is granted"
    )
    sip_outbound_proxy: str = _opt(
        "", "SIP proxy that dialled calls go through (sip:HOST[:PORT]); empty: direct"
    )
    sip_dial_timeout_s: float = _opt(30.0, "how long a dialled call may ring before it is given up (CANCEL)")
    transfer_to: str = _opt(
        "", "SIP URI of a person: a phone caller who asks for one (or presses 0) is transferred there (REFER)"
    )
    sip_max_message_bytes: int = _opt(
        16_384, "largest SIP datagram read; a longer one is answered 513 Message Too Large"
    )
    # --- phone providers (Twilio, Telnyx media websockets)
    twilio_auth_token: str = _opt(
        "",
        "Twilio auth token: /twilio/voice checks each webhook's X-Twilio-Signature with it "
        "(empty: unchecked, dev mode only)",
        secret=True,
    )
    provider_stream_token_ttl_s: float = _opt(
        60.0, "how long the one-time token in /twilio/voice's TwiML is good for its media websocket"
    )
    # --- WebRTC
    ice_servers: list[str] = _opt([], "STUN/TURN URLs (comma separated); empty = contact nothing outside")
    ice_host_addresses: list[str] = _opt(
        ["127.0.0.1"], "local IPs offered as ICE host candidates (comma separated); empty = all interfaces"
    )
    rx_prefetch_packets: int = _opt(
        1, "audio packets aiortc buffers before playout on the bot's receivers (aiortc: 4 = 80 ms)"
    )
    opus_plc: bool = _opt(
        True,
        "conceal lost caller packets before VAD and ASR: libopus rebuilds them from the next packet's "
        "FEC or by PLC (off: aiortc's own buffer, which waits up to 320 ms at a gap)",
    )
    opus_fec_loss_pct: int = _opt(
        10, "in-band FEC in the bot's opus audio, sized for this expected packet loss in percent (0 = off)"
    )
    # --- media and micro-turns
    micro_turn_ms: int = _opt(200, "length of one micro-turn, the decision clock")
    microturn_grid: bool = _opt(
        True,
        "every call's micro-turns end on one shared grid of the process clock, so a learned floor "
        "policy steps all calls in one batched forward (off: each call ticks from its own start)",
    )
    video_fps: float = _opt(2.0, "video frames sampled per second per participant (0 = none)")
    video_max_width: int = _opt(320, "sampled video frames are scaled down to at most this width")
    max_playout_ms: int = _opt(200, "largest playout delay inbound audio may get to ride out network jitter")
    vad_threshold: float = _opt(0.5, "speech probability at which a frame counts as voiced")
    peer_timeout_s: float = _opt(10.0, "a peer whose audio stops this long is treated as gone")
    # --- floor policy (rule-based baseline)
    policy: str = _opt(
        "fused",
        "floor policy: fused (silence + words + the audio and text end-of-turn detectors), rules (silence "
        "and words only, the old baseline), or model (the trained interaction model)",
        choices=("fused", "rules", "model"),
    )
    interaction_model: str = _opt(
        "",
        "policy=model: a checkpoint folder of the interaction model (empty: the one shipped in presence/model)",
    )
    # endpointing of policy=fused (see EndpointingOptions in presence/bot/policy.py)
    eot_min_delay_ms: int = _opt(
        200, "fused: silence that ends a turn when the detector is confident and the words look finished"
    )
    eot_delay_ms: int = _opt(800, "fused: silence that ends a turn when neither cue is decisive")
    eot_max_delay_ms: int = _opt(
        2500, "fused: longest silence before the turn is taken, even when a cue says 'unfinished'"
    )
    eot_complete_threshold: float = _opt(0.7, "fused: detector probability that counts as 'finished'")
    eot_incomplete_threshold: float = _opt(
        0.5, "fused: detector probability below which the turn counts as 'unfinished'"
    )
    eot_text_threshold: float = _opt(
        0.4,
        "fused: text end-of-turn probability (text_turn_detector) below which the words count as 'unfinished'",
    )
    eot_detector_reading: str = _opt(
        "first",
        "fused: which detector answer of a silence counts: first (at the first silent chunk, where "
        "the prosody is; later answers drift up with the silence) or latest",
        choices=("first", "latest"),
    )
    # endpointing of policy=rules
    eot_silence_ms: int = _opt(300, "rules: silence after caller speech that ends the caller's turn")
    eot_incomplete_ms: int = _opt(
        800, "rules: silence that ends a turn whose last word is 'and', 'the', 'to'..."
    )
    speculate_ms: int = _opt(
        40,
        "silence after which a reply is prepared speculatively (shorter: faster replies, more CPU on word gaps)",
    )
    min_turn_speech_ms: int = _opt(200, "caller speech needed before a turn can end (ignores clicks)")
    hold_onset_ms: int = _opt(60, "caller speech over the bot that pauses its output at once")
    barge_in_ms: int = _opt(
        500, "caller speech over the bot, with two recognised words not all backchannels, that is a barge-in"
    )
    barge_in_max_ms: int = _opt(
        1500,
        "caller speech over the bot that is a barge-in even before its words are recognised "
        "(the bot is silent from the onset anyway; longer lets side talk be recognised)",
    )
    resume_silence_ms: int = _opt(
        300, "silence after a short overlap before the bot resumes (false interruption)"
    )
    backchannel_words: list[str] = _opt(
        [
            "mm",
            "mhm",
            "mm-hm",
            "hmm",
            "uh-huh",
            "yeah",
            "yes",
            "yep",
            "ok",
            "okay",
            "right",
            "sure",
            "uh",
            "um",
            "ah",
            "oh",
            "i",
            "see",
        ],
        "words that count as a backchannel, not a barge-in",
    )
    bot_name: str = _opt(
        "Presence", "the bot's name: in a room of several people it answers when addressed by it"
    )
    bot_backchannels: bool = _opt(True, "let the bot backchannel during long caller turns")
    # Short and unmistakable: piper's "Mm-hm." lasts 0.9 s and whisper hears it as "and the M".
    backchannel_text: str = _opt("Uh-huh.", "what the bot says as a backchannel")
    backchannel_after_ms: int = _opt(3000, "caller speech before the bot backchannels in a short pause")
    # --- backends
    vad: str = _opt("silero", "voice activity detector", choices=("silero", "energy"))
    asr: str = _opt("pocketsphinx", "streaming ASR for partials", choices=("pocketsphinx", "none"))
    asr_workers: int = _opt(2, "worker processes of the streaming ASR; calls are spread over them")
    echo_cancel: str = _opt(
        "auto",
        "server-side echo cancellation of each caller's audio before VAD and ASR: on (phone-style "
        "callers: speakerphones, SIP), off, auto (off for WebRTC peers, which cancel their own echo)",
        choices=("auto", "on", "off"),
    )
    echo_canceller: str = _opt(
        "webrtc",
        "echo canceller: webrtc (AEC3, pywebrtc-audio) or speex (speexdsp)",
        choices=("webrtc", "speex"),
    )
    transcriber: str = _opt("whisper", "final-pass ASR of a turn", choices=("whisper", "none"))
    whisper_model: str = _opt("", "faster-whisper model: a local path or hub id (default: bundled tiny.en)")
    turn_detector: str = _opt(
        "smart-turn",
        "audio end-of-turn detector: smart-turn (v3.2 ONNX from the installed pipecat-ai wheel) or none",
        choices=("smart-turn", "none"),
    )
    text_turn_detector: str = _opt(
        "llm",
        "end of turn from the words: llm (the local llama.cpp model's next-token probability of a "
        "sentence end, when the responder is llama) or none",
        choices=("llm", "none"),
    )
    turn_detector_model: str = _opt(
        "", "smart-turn ONNX file: a local path or hub id (default: the file inside pipecat-ai)"
    )
    tts: str = _opt("piper", "speech synthesis", choices=("piper", "espeak"))
    tts_voice: str = _opt("", "piper .onnx path or espeak voice (default: bundled joe / 'en-us')")
    language: str = _opt("en", "the bot's spoken language")
    responder: str = _opt(
        "auto",
        "reply text: auto (local LLM if installed, else rules), llama, openai, rules",
        choices=("auto", "llama", "openai", "rules"),
    )
    llm_model: str = _opt("", "GGUF path for llama, or model name for openai (default: bundled Gemma 270M)")
    llm_url: str = _opt("", "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    llm_api_key: str = _opt("", "API key for the OpenAI-compatible endpoint", secret=True)
    llm_max_tokens: int = _opt(48, "longest reply in tokens")
    llm_prompt: str = _opt(
        "auto",
        "how the llama responder prompts: fewshot (base models), chat (the GGUF's chat template), "
        "auto (chat when the GGUF carries a chat template; the bundled Gemma carries none)",
        choices=("auto", "fewshot", "chat"),
    )
    system_prompt: str = _opt(
        "You are Presence, a friendly voice assistant on a call. Answer in one or two short spoken sentences.",
        "system prompt of the responder",
    )
    idle_prompt_s: float = _opt(
        30.0, "phone calls: silence on both sides before the bot asks 'Are you still there?' (0: never)"
    )
    idle_hangup_s: float = _opt(
        15.0, "phone calls: silence after that question before the bot says goodbye and hangs up"
    )
    max_call_s: float = _opt(3600.0, "longest call; the bot says goodbye and hangs up (0: no limit)")
    greeting: str = _opt(
        "Hi, I'm Presence. How can I help?", "what the bot says when a call starts ('' = nothing)"
    )
    notes_dir: str = _opt(
        "~/.local/share/presence/notes",
        "where the notes of a meeting the bot joined are written at its end ('' = nowhere)",
    )
    # --- jobs (Redis Streams)
    jobs: str = _opt(
        "auto",
        "background jobs: auto (Redis if one answers, else a private redis-server + in-process worker), redis, off",
        choices=("auto", "redis", "off"),
    )
    redis_url: str = _opt(
        "",
        "Redis URL for background jobs and the room queue (empty = redis://127.0.0.1:6379/0 if it answers)",
    )
    jobs_docs_dir: str = _opt(
        "", "folder of documents the search job indexes (empty = the bundled docs/ folder)"
    )
    web_search_url: str = _opt("", "HTTP search API for the search job (empty = local documents only)")
    job_timeout_s: float = _opt(20.0, "deadline of one background job")
    # --- rooms (the bot joins meetings on an SFU when asked through /api/rooms/join)
    rooms: bool = _opt(
        False,
        "take requests to join meetings on an SFU (POST /api/rooms/join) and share them with the "
        "other nodes through the Redis at redis_url",
    )
    rooms_capacity: int = _opt(
        4, "rooms this node is in at once (0: it only queues requests for other nodes)"
    )
    rooms_lease_s: float = _opt(
        6.0,
        "a node that has not refreshed its hold on a room for this long is presumed dead; another takes over",
    )
    rooms_max_backlog: int = _opt(
        100, "room requests waiting for a free node; past it new ones are refused with 503 and Retry-After"
    )
    rooms_handover: bool = _opt(
        True,
        "on a clean shutdown, leave this node's rooms for another node to rejoin (off: leave them for good)",
    )
    rooms_node_id: str = _opt("", "this node's name in the room queue (default: host-pid-random)")
    rooms_prefix: str = _opt(
        "presence", "prefix of the room queue's Redis keys (deployments sharing one Redis use different ones)"
    )
    # --- the interpreter (a room whose participants declare their languages)
    interpret_languages: list[str] = _opt(
        ["en", "es"], "languages a participant may declare (ISO 639-1; each pair needs a translator)"
    )
    interpret_default_language: str = _opt(
        "en", "language of an interpreter room's participants who declare none"
    )
    interpret_policy: str = _opt(
        "simultaneous",
        "simultaneous (speak committed clauses while the source talks) or consecutive (after the turn)",
        choices=("simultaneous", "consecutive"),
    )
    interpret_speech_translate: bool = _opt(
        False,
        "into English: whisper's translate task on the speech instead of transcript + translator "
        "(on espeak-ng Spanish, clause by clause: BLEU 22.6 against 25.4 for Apertium's)",
    )
    interpret_speech_rate: float = _opt(
        1.15, "the interpreter's voices speak this much faster than the bot's"
    )
    interpret_duck_db: float = _opt(-14.0, "level of the original speaker under an interpretation, in dB")
    interpret_max_lag_s: float = _opt(8.0, "an interpretation segment waiting longer than this is dropped")
    translator: str = _opt(
        "auto",
        "machine translation: auto (apertium where it has the pair, else openai with translate_url), "
        "apertium, openai (an OpenAI-compatible endpoint), transformers (translate_model by hub id)",
        choices=("auto", "apertium", "openai", "transformers"),
    )
    translate_url: str = _opt("", "OpenAI-compatible base URL for translation (default: llm_url)")
    translate_model: str = _opt("", "model name at translate_url, or a transformers hub id or path")
    multilingual_whisper_model: str = _opt(
        "", "faster-whisper model for languages other than English (default: bundled base, 99 languages)"
    )
    room_mix_max_peers: int = _opt(
        8, "a bot-hosted room mixes this many people for each other (and takes at most that many); 0: no mix"
    )
    # --- process
    event_loop: str = _opt(
        "uvloop",
        "event loop of presence serve: uvloop reads up to 32 datagrams per socket per wake-up, "
        "asyncio's one; on a busy loop that queues media in the kernel until ICE consent expires",
        choices=("uvloop", "asyncio"),
    )
    # --- logging
    log_level: str = _opt("info", "log level", choices=("debug", "info", "warning", "error"))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("settings (each also read from PRESENCE_<NAME>)")
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = _base_type(f)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = "(hidden)" if f.metadata.get("secret") and default else repr(default)
            help_text = f"{f.metadata.get('help', '')} [default: {shown}]"
            if kind is bool:
                group.add_argument(
                    flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
                )
            else:
                group.add_argument(
                    flag,
                    dest=f.name,
                    default=None,
                    metavar=f.name.upper(),
                    choices=f.metadata.get("choices"),
                    help=help_text,
                )

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
        overrides: dict[str, Any] = {}
        names = {f.name: f for f in dataclasses.fields(cls)}
        for name, value in vars(args).items():
            if name in names and value is not None:
                overrides[name] = value if isinstance(value, bool) else _parse(names[name], str(value))
        return cls.from_env(env, **overrides)

    def __post_init__(self) -> None:
        problems = []
        if self.micro_turn_ms % 20 or self.micro_turn_ms <= 0:
            problems.append("micro_turn_ms must be a positive multiple of 20")
        if not 0.0 < self.vad_threshold < 1.0:
            problems.append("vad_threshold must lie between 0 and 1")
        if self.video_fps < 0:
            problems.append("video_fps must not be negative")
        if not 0.0 <= self.eot_text_threshold <= 1.0:
            problems.append("eot_text_threshold must lie between 0 and 1")
        if not 0.0 <= self.eot_incomplete_threshold <= self.eot_complete_threshold <= 1.0:
            problems.append(
                "eot thresholds must satisfy 0 <= eot_incomplete_threshold <= eot_complete_threshold <= 1"
            )
        if not 0 <= self.eot_min_delay_ms <= self.eot_delay_ms <= self.eot_max_delay_ms:
            problems.append(
                "eot delays must satisfy 0 <= eot_min_delay_ms <= eot_delay_ms <= eot_max_delay_ms"
            )
        if self.max_body_bytes < 1024:
            problems.append("max_body_bytes must be at least 1024")
        if self.sip_port >= 0 and (self.sip_host or self.host) in ("0.0.0.0", "::", ""):
            problems.append(
                "SIP tells callers its address (Contact, SDP): set sip_host to an address of this "
                "machine they can reach, not a wildcard"
            )
        if not -1 <= self.sip_port <= 65535:
            problems.append("sip_port must be -1 (no SIP), 0 (a free port) or a UDP port")
        if not re.fullmatch(r"\d{1,5}(-\d{1,5})?", self.sip_rtp_ports):
            problems.append("sip_rtp_ports must be a port or a range such as 20000-20999")
        unknown = set(self.sip_codecs) - {"G722", "opus", "PCMU", "PCMA"}
        if unknown or not self.sip_codecs:
            problems.append(f"sip_codecs takes G722, opus, PCMU and PCMA (not {sorted(unknown)})")
        if self.max_peers_per_room < 1:
            problems.append("max_peers_per_room must be at least 1")
        if self.provider_stream_token_ttl_s <= 0:
            problems.append("provider_stream_token_ttl_s must be positive")
        if self.offer_rate_per_min < 0 or self.offer_burst < 1:
            problems.append("offer_rate_per_min must not be negative and offer_burst must be at least 1")
        if self.rooms_capacity < 0 or self.rooms_max_backlog < 1 or self.rooms_lease_s < 1.0:
            problems.append("rooms_capacity must be 0 or more, rooms_max_backlog and rooms_lease_s 1 or more")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.rooms_prefix):
            problems.append("rooms_prefix must be 1-64 letters, digits, '_', '.' or '-'")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{0,128}", self.rooms_node_id):
            problems.append("rooms_node_id must be up to 128 letters, digits, '_', '.' or '-'")
        if not 0.5 <= self.interpret_speech_rate <= 2.0 or self.interpret_max_lag_s <= 0:
            problems.append("interpret_speech_rate must lie in 0.5-2.0 and interpret_max_lag_s be positive")
        if self.interpret_default_language not in self.interpret_languages:
            problems.append("interpret_default_language must be one of interpret_languages")
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

    def exposure_problem(self) -> str | None:
        """Why serving with these settings would expose the bot to anyone on the network."""
        loopback = self.host == "localhost" or self.host.startswith("127.") or self.host == "::1"
        if loopback or self.token_secret or self.insecure_dev:
            return None
        return (
            f"refusing to listen on {self.host or 'every address'} without a token secret: anyone who "
            "reaches the port could call the bot and queue background jobs. Set PRESENCE_TOKEN_SECRET "
            "(--token-secret) to a long random string, bind to 127.0.0.1, or, for development only, "
            "set PRESENCE_INSECURE_DEV=1 (--insecure-dev)"
        )

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    def public_dict(self) -> dict[str, Any]:
        """Settings with secrets masked, for logs and /healthz."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "***"
            elif isinstance(value, str):
                value = redact(value)  # a password inside a URL (redis_url, llm_base_url)
            out[f.name] = value
        return out


def redact(text: str) -> str:
    """A URL, or any text that holds one (an error message), fit for logs: passwords masked."""
    return re.sub(r"//([^:@/\s]*):([^@/\s]+)@", r"//\1:***@", text)


def _base_type(f: dataclasses.Field[Any]) -> type:
    hints = typing.get_type_hints(Settings)
    kind = hints[f.name]
    if isinstance(kind, types.GenericAlias):
        return typing.get_origin(kind)  # type: ignore[return-value]
    return kind  # type: ignore[no-any-return]


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = _base_type(f)
    name = f.name
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is list:
            return [part.strip() for part in raw.split(",") if part.strip()]
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise ValueError(f"setting {name}: cannot read {raw!r} as {kind.__name__}") from None
    choices = f.metadata.get("choices")
    if choices and raw not in choices:
        raise ValueError(f"setting {name}: {raw!r} is not one of {', '.join(choices)}")
    return raw
