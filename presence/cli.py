"""The ``presence`` command line: serve, call, worker and bench."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from presence import __version__, aio, malloc
from presence.config import Settings

if TYPE_CHECKING:
    from presence.bot.calls import CallManager
    from presence.seams import CallEvent
    from presence.signaling.metrics import Metrics

log = logging.getLogger("presence")

DESCRIPTION = """\
Presence: a real-time, full-duplex call bot.

  presence serve                       run the signaling server and the bot in one process;
                                       prints the URL of the call page to open
  presence call URL --wav in.wav --record out.wav
                                       call a Presence server (or any WHIP endpoint) from the
                                       command line: sends in.wav in real time, records the bot
  presence worker --kinds search,code,think
                                       run a background-job worker against Redis
  presence bench latency               voice-to-voice and barge-in latency, CPU per call
  presence bench fdb --limit 5         Full-Duplex-Bench-style scores, report.md and plots
  presence bench longcall              a 10-minute Chromium video call: latency per minute
  presence bench responder --model X.gguf
                                       local LLMs side by side: first token, answer quality
  presence bench textturn              the LLM's end-of-turn judgement of the words: sweep
  presence bench aec                   server-side echo cancellation: ERLE, CPU, false barge-ins
  presence bench loss                  caller audio under packet loss: share reaching the model, WER
  presence bench jobs                  background jobs on Redis: overhead, throughput, recovery
  presence bench soak                  10 calls + a video call for 30 min: memory, drops, CPU
  presence bench batching              calls served per forward of the model: one grid vs own phases
  presence bench heldout               fused rule, silence rule and model on held-out dialogues
  presence train-interaction --help    train the interaction model (synthetic dialogues)

Every setting is also read from the environment as PRESENCE_<NAME> (e.g. PRESENCE_PORT=9000).
Defaults run offline on a CPU: Silero VAD, pocketsphinx + whisper tiny.en, piper (joe),
Gemma 270M through llama.cpp when installed.
"""


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # aioice and aiortc are chatty at info level about every candidate pair.
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


# ---------------------------------------------------------------------------------- serve
async def _start_bot(settings: Settings) -> tuple[CallManager, Metrics]:
    """Models warmed up, background jobs, and the call manager: what serving and joining share."""
    from presence.bot.backends.factory import build_backends, warm_up
    from presence.bot.calls import CallManager
    from presence.bot.jobs.bridge import JobBridge
    from presence.bot.jobs.think import responder_think_fn
    from presence.signaling.metrics import Metrics

    malloc.tune()  # before the first video frame: see presence/malloc.py
    log.debug("settings: %s", settings.public_dict())  # secrets and URL passwords masked
    print(f"presence {__version__}: loading models (first start assembles the LLM, ~10 s)...", flush=True)
    started = time.monotonic()
    backends = build_backends(settings)
    timings = await warm_up(backends)
    summary = ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
    print(f"models ready in {time.monotonic() - started:.1f} s ({summary})", flush=True)
    metrics = Metrics.create()
    # Without an LLM endpoint, "think" jobs run on the bot's own responder (the local model).
    options = {} if settings.llm_url else {"think_fn": responder_think_fn(backends.responder)}
    jobs = await JobBridge.start(settings, metrics, worker_options=options)
    print(f"background jobs: {jobs.describe()['mode'] if jobs is not None else 'off'}", flush=True)
    return CallManager(settings, backends, metrics, jobs), metrics


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    from presence.signaling.app import dev_join_url, run_server

    problem = settings.exposure_problem()
    if problem is not None:
        raise SystemExit(f"presence serve: {problem}")
    if settings.insecure_dev and not settings.token_secret:
        print(f"WARNING: insecure_dev: listening on {settings.host} with no token secret", flush=True)
    manager, metrics = await _start_bot(settings)
    metrics.calls_active.set_function(lambda: manager.active_calls)
    runner = await run_server(settings, manager)
    print(f"Presence is listening on {settings.base_url}", flush=True)
    print(f"Open this URL to call the bot: {dev_join_url(settings)}", flush=True)
    if ready is not None:
        ready.set()
    stop = _stop_on_signals()
    background = [
        asyncio.create_task(malloc.trim_periodically()),
        asyncio.create_task(aio.watch_loop_lag(metrics.loop_lag.observe)),
    ]
    try:
        await stop.wait()
    finally:
        print("shutting down...", flush=True)
        for task in background:
            task.cancel()
        await runner.cleanup()


# ---------------------------------------------------------------------------------- join
async def join(settings: Settings, args: argparse.Namespace) -> int:
    """Join a meeting on an SFU with a bot of this process; stay until it ends or Ctrl-C."""
    from presence.signaling.janus.room import JanusMeeting
    from presence.signaling.rooms import RoomJoinError, RoomRequest

    if not args.url.startswith(("janus://", "janus+http://")):
        print(f"presence join: {args.url!r} is not a janus://HOST:PORT/ROOM address", file=sys.stderr)
        return 2
    manager, _ = await _start_bot(settings)
    request = RoomRequest(id="cli", url=args.url, pin=args.pin or "", display=args.display or "")
    try:
        meeting = await JanusMeeting.join(manager, request, settings)
    except RoomJoinError as exc:
        print(f"cannot join {args.url}: {exc}", file=sys.stderr)
        await manager.close()
        return 1
    print(f"joined {args.url} as {meeting.display!r} (call {meeting.call_id}); Ctrl-C leaves", flush=True)
    session = manager.get(meeting.call_id)
    if session is not None:
        session.events.listen(_print_caption)
    stop = _stop_on_signals()
    ended = asyncio.ensure_future(meeting.wait_closed())
    await asyncio.wait({ended, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if not ended.done():
        print("leaving (writing the notes)...", flush=True)
        await meeting.leave()
    print(f"left: {await ended}", flush=True)
    if settings.notes_dir:
        print(
            f"notes: {os.path.join(os.path.expanduser(settings.notes_dir), f'meeting-{meeting.call_id}.md')}"
        )
    await manager.close()
    return 0


def _print_caption(event: CallEvent) -> None:
    d = event.data
    if event.name == "caption" and d.get("final") and d.get("pass_") != "final":
        who = (d.get("speaker") or "someone") if d.get("who") == "caller" else "bot"
        print(f"  {who}: {d.get('text')}", flush=True)
    elif event.name == "not_addressed":
        print(f"  {d.get('speaker') or 'someone'} (to the room): {d.get('text')}", flush=True)


# ---------------------------------------------------------------------------------- call
async def call(args: argparse.Namespace) -> int:
    import numpy as np

    from presence.caller import Caller, CallError
    from presence.media.audio import read_wav, write_wav

    caller = Caller(url=args.url, token=args.token or "", room=args.room, name=args.name)
    audio, rate = read_wav(args.wav) if args.wav else (np.zeros(0, np.float32), 16_000)
    try:
        await caller.connect()
    except (CallError, OSError) as exc:
        print(f"call failed: {exc}", file=sys.stderr)
        await caller.close()
        return 2
    print(f"connected (call {caller.call_id}); sending {audio.size / rate:.1f} s of audio", flush=True)
    t0 = caller.recorder.t0
    if audio.size:
        await caller.say(audio, rate)
    duration = args.duration or (audio.size / rate + args.tail)
    while time.monotonic() - t0 < duration:
        await asyncio.sleep(0.2)
        if caller.pc is not None and caller.pc.connectionState in ("failed", "closed"):
            print("the call dropped", file=sys.stderr)
            break
    await caller.hangup()
    if args.record:
        write_wav(args.record, caller.recorder.audio(until=t0 + duration), caller.recorder.rate)
        print(f"recorded {duration:.1f} s to {args.record}")
    if args.events:
        import json

        Path(args.events).write_text("\n".join(json.dumps(e) for e in caller.events) + "\n")
        print(f"{len(caller.events)} bot events written to {args.events}")
    for event in caller.events:
        if event.get("name") == "caption" and event.get("final"):
            print(f"  {event.get('who')}: {event.get('text')}")
    return 0


async def dial(args: argparse.Namespace) -> int:
    """Ask a running server to place a call, and follow it until answered or failed."""
    import aiohttp

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    body = {"to": args.uri, **({"room": args.room} if args.room else {})}
    base = args.url.rstrip("/")
    async with aiohttp.ClientSession(headers=headers) as http:
        try:
            async with http.post(f"{base}/api/dial", json=body) as r:
                reply = await r.json(content_type=None)
                if r.status != 202:
                    print(f"dial refused ({r.status}): {reply.get('message', reply)}", file=sys.stderr)
                    return 2
            shown = 0
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                async with http.get(f"{base}{reply['progress']}") as r:
                    state = await r.json(content_type=None)
                for step in state["steps"][shown:]:
                    print(f"  {step['status']}", flush=True)
                shown = len(state["steps"])
                if state["status"] == "answered":
                    print(f"answered: call {state['call_id']}")
                    return 0
                if state["status"] == "failed":
                    print(f"dial failed: {state['reason']}", file=sys.stderr)
                    return 1
                await asyncio.sleep(0.25)
        except (aiohttp.ClientError, OSError) as exc:
            print(f"cannot reach {base}: {exc}", file=sys.stderr)
            return 2
    print(
        f"no answer within {args.timeout:.0f} s (the server gives up after sip_dial_timeout_s)",
        file=sys.stderr,
    )
    return 1


# ---------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="presence", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"presence {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_serve = sub.add_parser(
        "serve", help="run the server and the bot", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    Settings.add_arguments(p_serve)

    p_call = sub.add_parser("call", help="call a server from the command line")
    p_call.add_argument("url", help="server base URL (http://host:port) or a WHIP endpoint URL (.../whip)")
    p_call.add_argument("--wav", help="audio to send in real time (any rate; mono or stereo)")
    p_call.add_argument("--record", help="write what the bot said to this WAV (16 kHz)")
    p_call.add_argument("--events", help="write the bot's events (JSON lines) to this file")
    p_call.add_argument(
        "--duration", type=float, default=0.0, help="call length in s (default: WAV + --tail)"
    )
    p_call.add_argument("--tail", type=float, default=6.0, help="seconds to stay on after the WAV ends")
    p_call.add_argument("--token", help="join token, when the server requires one")
    p_call.add_argument("--room", help="room to join (several people in one call)")
    p_call.add_argument("--name", default="caller", help="participant name")
    p_call.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))

    p_dial = sub.add_parser("dial", help="have a running server place a phone call (SIP)")
    p_dial.add_argument("uri", help="whom to call: a SIP URI such as sip:alice@192.0.2.10:5060")
    p_dial.add_argument("--url", default="http://127.0.0.1:8080", help="the server's base URL")
    p_dial.add_argument("--token", help="a token with role 'operator', when the server has a token secret")
    p_dial.add_argument("--room", help="put the answered call in this room")
    p_dial.add_argument("--timeout", type=float, default=60.0, help="seconds to follow the dial")

    p_join = sub.add_parser(
        "join", help="join a meeting on an SFU (janus://HOST:PORT/ROOM) with a bot of this process"
    )
    p_join.add_argument("url", help="janus://HOST:PORT/ROOM (HTTP API port, usually 8088)")
    p_join.add_argument("--pin", default="", help="the room's PIN, if it has one")
    p_join.add_argument("--display", default="", help="the bot's name in the room (default: bot_name)")
    Settings.add_arguments(p_join)
    p_worker = sub.add_parser("worker", help="run a background-job worker (Redis Streams)")
    p_worker.add_argument("--kinds", default="search,code,think", help="job kinds to serve, comma separated")
    p_worker.add_argument(
        "--docs", default="", help="folder of documents the search kind indexes (default: jobs_docs_dir)"
    )
    p_worker.add_argument("--prefix", default="presence", help="Redis key prefix (tests use a unique one)")
    p_worker.add_argument("--consumer", default=None, help="worker name (default: host-pid-random)")
    p_worker.add_argument("--concurrency", type=int, help="jobs run at once (default 1)")
    p_worker.add_argument("--idle-reclaim-ms", type=int, help="take over a silent worker's job after this")
    p_worker.add_argument("--max-attempts", type=int, help="deliveries of a job before it is dead")
    p_worker.add_argument(
        "--test-kinds", action="store_true", help="also serve the test-only kinds sleep and fail"
    )
    Settings.add_arguments(p_worker)

    sub.add_parser("train-interaction", help="train the interaction model (see its --help)", add_help=False)
    p_bench = sub.add_parser("bench", help="benchmarks that print numbers")
    bench_sub = p_bench.add_subparsers(dest="bench", metavar="BENCH")
    p_lat = bench_sub.add_parser(
        "latency", help="voice-to-voice, barge-in stop, CPU per call vs an echo call"
    )
    p_lat.add_argument("--trials", type=int, default=20)
    p_lat.add_argument("--calls", default="1,5,10", help="concurrency levels for the CPU measurement")
    p_lat.add_argument("--cpu-seconds", type=float, default=20.0, help="measurement window per level")
    p_lat.add_argument("--skip-cpu", action="store_true")
    p_lat.add_argument(
        "--transports",
        default="webrtc",
        help="callers, comma separated: webrtc, sip-pcmu (a phone line), sip-g722 (wideband), twilio (a Twilio number); "
        "several run the same trials side by side against the same servers",
    )
    p_lat.add_argument("--json", help="also write the results here")
    Settings.add_arguments(p_lat)
    p_long = bench_sub.add_parser(
        "longcall", help="a long Chromium video call: latency, memory and false turns per minute"
    )
    from presence.bench.longcall import add_arguments as longcall_arguments

    longcall_arguments(p_long)
    bench_sub.add_parser(
        "responder", help="local LLMs side by side: latency and answer quality (see --help)", add_help=False
    )
    bench_sub.add_parser(
        "textturn",
        help="the text end-of-turn detector on the project's own sentences (see --help)",
        add_help=False,
    )
    bench_sub.add_parser(
        "aec",
        help="server-side echo cancellation: ERLE, CPU, false barge-ins over a call (see --help)",
        add_help=False,
    )
    bench_sub.add_parser(
        "fdb",
        help="Full-Duplex-Bench-style interaction quality over real WebRTC (see --help)",
        add_help=False,
    )
    bench_sub.add_parser(
        "loss",
        help="caller audio under simulated packet loss, concealment off and on (see --help)",
        add_help=False,
    )
    bench_sub.add_parser(
        "jobs",
        help="the job layer on a real Redis: overhead, throughput, killed workers (see --help)",
        add_help=False,
    )
    bench_sub.add_parser(
        "soak",
        help="10 calls and a video call for 30 minutes: memory per minute, dropped calls (see --help)",
        add_help=False,
    )
    bench_sub.add_parser(
        "narrowband",
        help="VAD, end-of-turn detector and ASR on phone audio (G.711, G.722) against wideband",
        add_help=False,
    )
    bench_sub.add_parser(
        "heldout",
        help="floor policies side by side on held-out synthetic dialogues (fused, rules, model)",
        add_help=False,
    )
    bench_sub.add_parser(
        "batching",
        help="calls served per forward of the interaction model, one shared grid against own phases",
        add_help=False,
    )
    bench_sub.add_parser(
        "interpret",
        help="the live interpreter: StartOffset, EndOffset, LAAL, ASR-BLEU per policy (see --help)",
        add_help=False,
    )
    return parser


# Benchmarks with a parser of their own: name -> module with ``main(argv)``.
OWN_PARSER = {
    "responder": "presence.bench.responder",
    "textturn": "presence.bench.textturn",
    "aec": "presence.bench.aec",
    "loss": "presence.bench.loss",
    "soak": "presence.bench.soak",
    "jobs": "presence.bench.jobs",
    "fdb": "presence.bench.fdb.cli",
    "narrowband": "presence.bench.narrowband",
    "meeting": "presence.bench.meeting",
    "interpret": "presence.bench.interpret",
    "batching": "presence.bench.batching",
    "heldout": "presence.bench.heldout",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-interaction"]:  # its own parser: presence train-interaction --help
        from presence.model.train import main as train_main

        return int(train_main(argv[1:]) or 0)
    if argv[:1] == ["bench"] and argv[1:2] and argv[1] in OWN_PARSER:  # presence bench X --help
        _logging("warning")
        result = importlib.import_module(OWN_PARSER[argv[1]]).main(argv[2:])
        return int(asyncio.run(result) if asyncio.iscoroutine(result) else result)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "serve":
            settings = Settings.from_args(args)
            _logging(settings.log_level)
            aio.run(serve(settings), settings.event_loop)
            return 0
        if args.command == "join":
            settings = Settings.from_args(args)
            _logging(settings.log_level)
            return aio.run(join(settings, args), settings.event_loop)
        if args.command == "call":
            _logging(args.log_level)
            return asyncio.run(call(args))
        if args.command == "dial":
            _logging("warning")
            return asyncio.run(dial(args))
        if args.command == "worker":
            settings = Settings.from_args(args)
            _logging(settings.log_level)
            from presence.bot.jobs.worker import run_worker

            kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
            options = {
                k: getattr(args, k)
                for k in ("concurrency", "idle_reclaim_ms", "max_attempts", "test_kinds")
                if getattr(args, k) is not None
            }
            asyncio.run(
                run_worker(
                    settings,
                    kinds,
                    docs_dir=args.docs,
                    consumer_name=args.consumer,
                    prefix=args.prefix,
                    options=options,
                )
            )
            return 0
        if args.command == "bench":
            if args.bench == "longcall":
                _logging("warning")
                from presence.bench.longcall import run as run_longcall

                # the bot is its own process and reads PRESENCE_* itself; --set adds more
                return asyncio.run(run_longcall(Settings(), args))
            if args.bench != "latency":
                parser.parse_args(["bench", "--help"])
                return 2
            settings = Settings.from_args(args)
            _logging("warning")
            from presence.bench.latency import run as run_latency

            return asyncio.run(run_latency(settings, args))
    except ValueError as exc:  # bad settings: say what and exit, no traceback
        print(f"presence: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if type(exc).__name__ != "JobsUnavailable":
            raise
        print(f"presence: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
