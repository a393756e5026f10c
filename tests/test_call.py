"""Real calls end to end: an aiortc caller talks to ``presence`` (real models, real WebRTC).

Timing goals live in ``presence bench latency``; these tests check behaviour, with generous
bounds only where "did it stop at all" needs one.
"""

from __future__ import annotations

import asyncio
import gc

import aiohttp
import pytest
from aiortc import RTCPeerConnection
from conftest import SR_OUT, BotServer, bot_heard, heard_as

from presence.caller import Caller, CallError
from presence.clock import now
from presence.events import Ev
from presence.seams import SAMPLE_RATE

pytestmark = pytest.mark.slow

LONG_GREETING = (
    "Hello and welcome. I am Presence, a voice assistant that listens while it talks. "
    "Today I can help you with questions about your account, your bills, and your plans. "
    "Take your time, and tell me what you need whenever you are ready."
)


async def _connect(server: BotServer, **kwargs: object) -> Caller:
    caller = Caller(url=server.url, **kwargs)  # type: ignore[arg-type]
    await caller.connect()
    return caller


def _session(server: BotServer):  # type: ignore[no-untyped-def]
    assert len(server.manager.sessions) == 1
    return next(iter(server.manager.sessions.values()))


async def test_caller_asks_and_hears_the_answer(bot: BotServer, speech, backends) -> None:  # type: ignore[no-untyped-def]
    question = speech("What is your name?")
    caller = await _connect(bot)
    try:
        await asyncio.sleep(0.5)
        sent_at = await caller.say(question, SR_OUT)
        start = await caller.wait_event(Ev.BOT_SPEECH_START, after=sent_at, timeout=20)
        end = await caller.wait_event(Ev.BOT_SPEECH_END, after=float(start["t"]), timeout=30)  # type: ignore[arg-type]
        await asyncio.sleep(0.4)  # the tail still in flight
        heard = caller.recorder.audio()
        begin = int((float(start["t"]) - caller.recorder.t0) * SAMPLE_RATE)  # type: ignore[arg-type]
        stop = int((float(end["t"]) - caller.recorder.t0 + 0.4) * SAMPLE_RATE)  # type: ignore[arg-type]
        answer = heard[max(0, begin - 1600) : stop]
        assert answer.size > SAMPLE_RATE // 2, "the bot said nothing audible"
        text = (await asyncio.to_thread(backends.transcriber.transcribe, answer)).text
        session = _session(bot)
        said = [m.content for m in session.engine.history if m.role == "assistant"]
        # what the reply answered: the streaming ASR's text (whisper's final pass comes later)
        asked = [
            str(e.get("text", "")).lower()
            for e in caller.events
            if e.get("name") == "caption" and e.get("who") == "caller" and e.get("final") and "pass_" not in e
        ]
        assert said, "no answer"
        if asked and "your name" in asked[0]:  # the bot knows its name (when it heard the question)...
            assert "presence" in said[0].lower(), (asked, said)
        assert heard_as(text, said[0]), (
            f"the caller heard {text!r}, the bot said {said[0]!r}"
        )  # ...and it arrived
        # Captions went out on the data channel.
        names = {e.get("name") for e in caller.events}
        assert {"caption", "state", "end_of_turn_decided", "bot_first_packet_sent"} <= names
    finally:
        await caller.hangup()


async def test_barge_in_stops_the_bot_at_the_caller(bot_factory, speech) -> None:  # type: ignore[no-untyped-def]
    interruption = speech("Wait, stop. I have a different question about my bill.")  # before the call
    server = await bot_factory(greeting=LONG_GREETING)
    caller = await _connect(server)
    try:
        start = await caller.wait_event(Ev.BOT_SPEECH_START, timeout=20)
        await asyncio.sleep(1.5)
        onset = await caller.say(interruption, SR_OUT)
        flushed = await caller.wait_event(Ev.PLAYBACK_FLUSHED, after=onset, timeout=10)
        await asyncio.sleep(1.0)
        last = caller.recorder.last_voiced_at
        assert last is not None and last > float(start["t"])  # type: ignore[arg-type]
        # The bot's voice stopped at the caller soon after the onset (the benchmark measures it).
        assert last - onset < 1.5, f"bot audio went on {last - onset:.2f} s after the caller began"
        session = _session(server)
        said = [m.content for m in session.engine.history if m.role == "assistant"]
        assert said and said[0].endswith("…") and len(said[0]) < len(LONG_GREETING)
        assert flushed.get("heard") and LONG_GREETING.startswith(str(flushed["heard"]).rstrip("…")[:20])
    finally:
        await caller.hangup()


async def test_backchannel_does_not_stop_the_bot(bot_factory, speech) -> None:  # type: ignore[no-untyped-def]
    okay = speech("Okay.")  # synthesised before the call: the sync TTS would stall the loop
    server = await bot_factory(greeting=LONG_GREETING)
    caller = await _connect(server)
    try:
        start = await caller.wait_event(Ev.BOT_SPEECH_START, timeout=20)
        await asyncio.sleep(2.0)
        await caller.say(okay, SR_OUT)
        end = await caller.wait_event(Ev.BOT_SPEECH_END, after=float(start["t"]), timeout=30)  # type: ignore[arg-type]
        assert end.get("flushed") is False
        assert not [e for e in caller.events if e.get("name") == Ev.BARGE_IN_DETECTED]
        session = _session(server)
        said = [m.content for m in session.engine.history if m.role == "assistant"]
        assert said == [LONG_GREETING.strip()], said
        # ...and the "mm-hm" did not become a turn the bot answers.
        await asyncio.sleep(1.5)
        assert not [m for m in session.engine.history if m.role == "user"]
    finally:
        await caller.hangup()


async def test_vanishing_caller_is_cleaned_up(bot: BotServer, speech) -> None:  # type: ignore[no-untyped-def]
    words = speech("I was saying something important when")
    gc.collect()
    tasks_before = len(asyncio.all_tasks())
    caller = await _connect(bot)
    session = _session(bot)
    await caller.say(words, SR_OUT)
    await caller.wait_event(Ev.CALLER_SPEECH_START, timeout=10)
    # Vanish mid-utterance: no hang-up request, the peer connection just goes away.
    await caller.close()
    deadline = now() + 15
    while bot.manager.sessions and now() < deadline:
        await asyncio.sleep(0.1)
    assert not bot.manager.sessions, "the session outlived its only caller"
    assert session.closed and not session.peers
    assert session.track.readyState == "ended"
    await asyncio.sleep(0.5)
    gc.collect()
    leftover = [t for t in asyncio.all_tasks() if not t.done()]
    assert len(leftover) <= tasks_before, [t.get_name() for t in leftover]


async def test_silent_caller_times_out(bot_factory, speech) -> None:  # type: ignore[no-untyped-def]
    server = await bot_factory(peer_timeout_s=1.0)
    gc.collect()
    tasks_before = {t.get_name() for t in asyncio.all_tasks()}
    caller = await _connect(server)
    call_id = _session(server).call_id
    # Stop the caller's media without closing anything: as if its network went away.
    caller.player.stop()
    deadline = now() + 10
    while server.manager.sessions and now() < deadline:
        await asyncio.sleep(0.1)
    assert not server.manager.sessions
    await caller.close()
    await asyncio.sleep(1.0)  # a watchdog that went on would tick again by now
    gc.collect()
    leftover = [t.get_name() for t in asyncio.all_tasks() if not t.done()]
    assert not [name for name in leftover if call_id in name], leftover  # engine, watchdog, readers
    assert len(leftover) <= len(tasks_before) + 1, sorted(set(leftover) - tasks_before)


@pytest.mark.parametrize("ending", ["hangup", "vanish", "timeout", "shutdown"])
async def test_every_way_a_call_ends_leaves_nothing_behind(bot_factory, speech, ending: str) -> None:  # type: ignore[no-untyped-def]
    """Hang-up, the peer connection closing, the peer going silent, the server shutting down:
    each ends the call's tasks, tracks, peer connections and session."""
    server = await bot_factory(peer_timeout_s=1.0)
    gc.collect()
    tasks_before = {t.get_name() for t in asyncio.all_tasks() if not t.done()}
    caller = await _connect(server)
    session = _session(server)
    await caller.say(speech("Hello, can you hear me?"), SR_OUT)
    await caller.wait_event(Ev.CALLER_SPEECH_START, timeout=20)  # ended mid-utterance
    server_pcs = [peer.link.pc for peer in session.peers.values()]
    if ending == "hangup":
        await caller.hangup()
    elif ending == "vanish":
        await caller.close()
    elif ending == "timeout":
        caller.player.stop()  # media stops, nothing is closed: a network gone away
    else:
        await server.manager.close()
    deadline = now() + 15
    while server.manager.sessions and now() < deadline:
        await asyncio.sleep(0.1)
    await caller.close()
    assert not server.manager.sessions, f"{ending}: the session outlived the call"
    assert session.closed and not session.peers
    assert session.track.readyState == "ended"
    assert all(pc.connectionState == "closed" for pc in server_pcs)
    await asyncio.sleep(1.0)  # a loop that went on would have ticked again by now
    gc.collect()
    leftover = {t.get_name() for t in asyncio.all_tasks() if not t.done()}
    assert not [name for name in leftover if session.call_id in name], leftover
    assert leftover <= tasks_before | {asyncio.current_task().get_name()}, leftover - tasks_before  # type: ignore[union-attr]


async def test_bad_input_is_refused_while_a_call_goes_on(bot_factory, speech) -> None:  # type: ignore[no-untyped-def]
    from presence.signaling import tokens

    question = speech("What is your name?")
    secret = "s3cret-of-at-least-32-bytes-for-hs256"  # HS256 wants 32 bytes
    server = await bot_factory(token_secret=secret)
    token = tokens.mint(secret, room=None, sub="tester", ttl_s=60)
    caller = await _connect(server, token=token)
    base = server.url
    try:
        async with aiohttp.ClientSession() as http:
            pc = RTCPeerConnection()
            pc.addTransceiver("audio")
            await pc.setLocalDescription(await pc.createOffer())
            good_offer = pc.localDescription.sdp
            await pc.close()
            auth = {"Authorization": f"Bearer {token}"}
            cases = [
                ("POST", "/whip", {**auth, "Content-Type": "application/sdp"}, "v=0\r\nthis is not sdp", 400),
                ("POST", "/whip", {**auth, "Content-Type": "text/plain"}, good_offer, 415),
                (
                    "POST",
                    "/whip",
                    {**auth, "Content-Type": "application/sdp"},
                    "v=0\r\n" + "a" * 200_000,
                    413,
                ),
                ("POST", "/whip", {"Content-Type": "application/sdp"}, good_offer, 401),
                (
                    "POST",
                    "/whip",
                    {"Authorization": "Bearer nonsense", "Content-Type": "application/sdp"},
                    good_offer,
                    401,
                ),
                (
                    "POST",
                    "/whip",
                    {
                        "Authorization": "Bearer "
                        + tokens.mint(secret, room=None, sub="x", ttl_s=5, now=0.0),
                        "Content-Type": "application/sdp",
                    },
                    good_offer,
                    401,
                ),
                ("POST", "/api/offer", {"Content-Type": "application/json"}, "{not json", 400),
                # hanging up takes the call's own resource token, not a join token
                ("DELETE", "/whip/resource/doesnotexist", auth, None, 403),
                ("DELETE", "/whip/resource/doesnotexist", {}, None, 401),
            ]
            for method, path, headers, body, status in cases:
                async with http.request(method, base + path, headers=headers, data=body) as resp:
                    assert resp.status == status, (path, headers.get("Content-Type"), await resp.text())
                    error = (await resp.json())["error"]
                    assert error["code"] and error["message"]
            # A valid offer whose media cannot be answered by the bot (no audio) is a clear 400.
            pc = RTCPeerConnection()
            pc.createDataChannel("x")
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(
                base + "/whip",
                headers={**auth, "Content-Type": "application/sdp"},
                data=pc.localDescription.sdp,
            ) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["code"] == "no_audio"
            await pc.close()
            # Double hang-up: the second one is a 404. The join token hangs nothing up.
            second = await _connect(server, token=token)
            assert second.resource and second.resource_token
            async with http.delete(second.resource, headers=auth) as resp:
                assert resp.status == 403 and (await resp.json())["error"]["code"] == "bad_resource_token"
            owner = {"Authorization": f"Bearer {second.resource_token}"}
            async with http.delete(second.resource, headers=owner) as resp:
                assert resp.status == 200
            async with http.delete(second.resource, headers=owner) as resp:
                assert resp.status == 404
            await second.close()
            # The first call was never disturbed: it still answers.
            assert caller.pc is not None and caller.pc.connectionState == "connected"
            sent_at = await caller.say(question, SR_OUT)
            await caller.wait_event(Ev.BOT_SPEECH_START, after=sent_at, timeout=20)
            async with http.get(base + "/healthz") as resp:
                assert resp.status == 200 and (await resp.json())["calls"] == 1
    finally:
        await caller.hangup()


async def test_two_people_in_one_room_share_one_call(bot: BotServer, speech) -> None:  # type: ignore[no-untyped-def]
    question = speech("Presence, what is your name?")  # in a room, the bot answers when addressed
    ann = await _connect(bot, room="standup", name="ann")
    bob = await _connect(bot, room="standup", name="bob")
    try:
        session = _session(bot)
        assert sorted(p.participant for p in session.peers.values()) == ["ann", "bob"]
        # as in the other call tests: a question sent the moment bob's peer connects can lose its
        # first packets while the room sets bob up ("Presence" came out as "residents" in CI)
        await asyncio.sleep(0.5)
        sent_at = await bob.say(question, SR_OUT)
        # Both hear the bot answer bob.
        for caller in (ann, bob):
            try:
                await caller.wait_event(Ev.BOT_SPEECH_START, after=sent_at, timeout=20)
            except TimeoutError:
                pytest.fail(f"no answer; the bot heard {bot_heard(session)}")
        await asyncio.sleep(1.0)
        for caller in (ann, bob):
            assert caller.recorder.last_voiced_at is not None and caller.recorder.last_voiced_at > sent_at
        await ann.hangup()
        await asyncio.sleep(0.3)
        assert len(bot.manager.sessions) == 1 and len(session.peers) == 1
    finally:
        await bob.hangup()
    await asyncio.sleep(0.3)
    assert not bot.manager.sessions


async def test_a_full_room_refuses_the_next_caller(bot_factory) -> None:  # type: ignore[no-untyped-def]
    server = await bot_factory(max_peers_per_room=2)
    ann = await _connect(server, room="small", name="ann")
    bob = await _connect(server, room="small", name="bob")
    carl = Caller(url=server.url, room="small", name="carl")
    try:
        with pytest.raises(CallError, match=r"HTTP 409.*room_full"):
            await carl.connect()
        session = _session(server)
        assert sorted(p.participant for p in session.peers.values()) == ["ann", "bob"]
        assert all(c.pc is not None and c.pc.connectionState == "connected" for c in (ann, bob))
        # the others learn names, never peer ids (a peer id is its owner's to hang up with)
        await ann.wait_event(Ev.PARTICIPANT_JOINED, timeout=5)
        joined = [e for e in ann.events if e.get("name") == Ev.PARTICIPANT_JOINED]
        assert joined and all("peer" not in e for e in joined), joined
        await bob.hangup()
        await asyncio.sleep(0.3)
        dave = await _connect(server, room="small", name="dave")  # a free place again
        await dave.hangup()
    finally:
        await carl.close()
        await ann.hangup()
        await bob.hangup()


@pytest.mark.parametrize("when", ["speech start", "first words"])
async def test_asr_worker_dying_mid_call_loses_no_turn(bot: BotServer, speech, backends, when: str) -> None:  # type: ignore[no-untyped-def]
    """The call's pocketsphinx worker dies mid-utterance: as it starts (a call in flight fails),
    or after its first words (between two calls: the next call finds a new worker that knows
    nothing of the utterance). Either way the turn is answered from the whole-turn transcription,
    not from what the new worker heard of it, and the next turn works."""
    hello, question = speech("Please tell me what the weather is like today."), speech("What is your name?")
    caller = await _connect(bot)
    try:
        sent_at = await caller.say(hello, SR_OUT)
        await caller.wait_event(Ev.CALLER_SPEECH_START, timeout=10)
        session = _session(bot)
        host = session.engine._asr._host  # the worker process behind this call's streaming ASR
        for _ in range(200):
            if host._proc is not None and (when == "speech start" or session.engine.state.partial_text):
                break
            await asyncio.sleep(0.05)
        assert host._proc is not None
        host._proc.kill()
        host._proc.wait()
        caption = await caller.wait_event(Ev.ASR_FINAL, after=sent_at, timeout=30)
        await caller.wait_event(Ev.BOT_SPEECH_END, after=sent_at, timeout=30)
        user = [m.content for m in session.engine.history if m.role == "user"]
        assert user, f"no caller turn reached the context ({caption})"
        # "please" was decoded before the kill: a new worker alone would not have it
        assert "please" in user[-1].lower() and "weather" in user[-1].lower(), user
        sent_at = await caller.say(question, SR_OUT)
        await caller.wait_event(Ev.BOT_SPEECH_START, after=sent_at, timeout=30)
        assert host._proc is not None and host._proc.poll() is None  # a new worker took over
    finally:
        await caller.hangup()
