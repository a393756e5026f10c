"""Rooms where people hear each other, and the live interpreter, over real aiortc calls.

The voices: piper for English, espeak-ng for Spanish (robotic). What each caller received is
transcribed offline (whisper) and searched for content words; the Spanish interpretation, which
whisper base reads unreliably in espeak-ng's voice, is found in what its listener received by
its waveform.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SR_OUT, BotServer, need, rms

from presence.bench.fdb.calibrate import xcorr_delay
from presence.bench.interpret_corpus import voice
from presence.bot.session import CallSession
from presence.caller import Caller, CallError
from presence.events import CallEvent, Ev
from presence.media.audio import resample, write_wav
from presence.seams import SAMPLE_RATE

pytestmark = pytest.mark.slow

SPANISH = (
    "Mañana tenemos una reunión muy importante en la oficina, "
    "después vamos a comer juntos en el restaurante, "
    "y por la tarde vamos a visitar el museo de la ciudad."
)
ENGLISH = "The new office is very big, and the kitchen has a large window."


@pytest.fixture(scope="module")
def spanish() -> np.ndarray:
    need(
        shutil.which("espeak-ng") is not None,
        "espeak-ng (apt-get install espeak-ng) speaks the Spanish caller",
    )
    tts = voice("es")  # the bench's Spanish speaker: espeak-ng with a pause between clauses
    return resample(np.concatenate(list(tts.synthesize(SPANISH))), tts.sample_rate, SR_OUT)


async def _join(server: BotServer, room: str, name: str, **kw: object) -> Caller:
    caller = Caller(url=server.url, room=room, name=name, **kw)  # type: ignore[arg-type]
    await caller.connect()
    return caller


def _window(caller: Caller, start: float, end: float) -> np.ndarray:
    rec = caller.recorder
    audio = rec.audio(until=end)
    return audio[max(0, int((start - rec.t0) * rec.rate)) : int((end - rec.t0) * rec.rate)]


def _delivered(caller: Caller, voice: np.ndarray, after: float) -> tuple[float, float]:
    """Where ``voice`` (16 kHz) begins in what ``caller`` received, in seconds after ``after``
    (up to 2 s), and how alike the two are there: the median over its voiced 0.4 s pieces of
    each piece's normalised correlation (1.0: the same waveform), each piece free to sit up to
    0.1 s off the whole (a late packet shifts the rest of a segment)."""
    piece, slack = SAMPLE_RATE * 2 // 5, SAMPLE_RATE // 10
    heard = _window(caller, after, after + 2.0 + voice.size / SAMPLE_RATE + 0.2)
    lag = xcorr_delay(voice, heard, SAMPLE_RATE, max_lag_s=2.0)
    start = round(lag * SAMPLE_RATE)
    scores = []
    for i in range(0, voice.size - piece + 1, piece):
        ref = voice[i : i + piece]
        got = heard[max(0, start + i - slack) : start + i + piece + slack]
        if rms(ref) < 0.01 or got.size < piece:  # between words, or past what was received
            continue
        energy = np.sqrt(np.convolve(got**2, np.ones(piece), "valid"))
        corr = np.correlate(got, ref, "valid") / (np.linalg.norm(ref) * np.maximum(energy, 1e-6))
        scores.append(float(corr.max()))
    return lag, float(np.median(scores)) if scores else 0.0


def _frames(audio: np.ndarray) -> np.ndarray:
    """The level of each 20 ms frame."""
    n = SAMPLE_RATE // 50
    return np.sqrt(np.mean(audio[: audio.size // n * n].reshape(-1, n) ** 2, axis=1))


async def _quiet(callers: list[Caller], after: float, quiet_s: float = 3.0, limit_s: float = 40.0) -> None:
    """Until a caller has heard something after ``after`` and then nothing for ``quiet_s``
    (the interpretation is over)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        last = max((c.recorder.last_voiced_at or 0.0) for c in callers)
        if last > after and loop.time() - last > quiet_s:
            return
        await asyncio.sleep(0.2)


async def _interpreted(
    session: CallSession, callers: list[Caller], after: float, target: str
) -> list[CallEvent]:
    """The interpretation segments into ``target`` after ``after``, once they have stopped coming
    and the callers have been quiet for a while after the last one. Under load a segment can be
    handed to its channel seconds after its source sentence ended."""

    def segments() -> list[CallEvent]:
        return [
            e
            for e in session.events.history
            if e.name == Ev.INTERPRETATION_SEGMENT and e.t > after and e.data["target_language"] == target
        ]

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30.0
    while not segments() and loop.time() < deadline:
        await asyncio.sleep(0.2)
    seen = -1
    while len(segments()) != seen:
        seen = len(segments())
        await _quiet(callers, max([after] + [e.t for e in segments()]))
    return segments()


async def test_people_in_a_plain_room_hear_each_other_and_never_themselves(
    bot: BotServer, speech, backends
) -> None:  # type: ignore[no-untyped-def]
    said = "We could move the review to Thursday afternoon if everyone agrees."
    clip = speech(said)
    callers = [await _join(bot, "plain", n) for n in ("ann", "bob", "cai")]
    ann = callers[0]
    try:
        await asyncio.sleep(0.5)
        t0 = await ann.say(clip, SR_OUT)
        end = t0 + clip.size / SR_OUT
        await asyncio.sleep(end - t0 + 1.0)
        heard = {c.name: _window(c, t0, end + 0.5) for c in callers}
        levels = {name: round(rms(a), 4) for name, a in heard.items()}
        # bob and cai hear ann's voice; she hears silence (nobody addressed the bot)
        assert levels["bob"] > 0.01 and levels["cai"] > 0.01, levels
        assert levels["ann"] < levels["bob"] / 10, levels
        # off the loop: the server and the callers share it
        text = (await asyncio.to_thread(backends.transcriber.transcribe, heard["bob"])).text.lower()
        write_wav("/tmp/bob.wav", heard["bob"], 16000)
        for word in ("review", "thursday", "afternoon"):
            assert word in text, text
    finally:
        for caller in callers:
            await caller.hangup()


async def test_two_languages_hear_each_other_interpreted_while_the_speaker_still_talks(  # type: ignore[no-untyped-def]
    bot: BotServer, speech, backends, spanish
) -> None:
    room = "interp"
    ana = await _join(bot, room, "ana", language="es")
    ben = await _join(bot, room, "ben", language="en")
    cal = await _join(bot, room, "cal", language="en", original=False)  # the English channel alone
    callers = [ana, ben, cal]
    try:
        session = next(iter(bot.manager.sessions.values()))
        assert session.room_audio.interpreter is not None
        assert session.room_audio.interpreter.languages == {"ana": "es", "ben": "en", "cal": "en"}
        await asyncio.sleep(1.0)

        # Spanish -> English, simultaneous: the first English words come before ana is done.
        t0 = await ana.say(spanish, SR_OUT)
        source_end = t0 + spanish.size / SR_OUT
        await asyncio.sleep(source_end - t0)
        segments = await _interpreted(session, callers, t0, "en")
        first = cal.recorder.first_voiced_after(t0)
        assert first is not None, session.events.history
        assert first < source_end, f"interpretation began {first - source_end:.2f} s after the source ended"
        assert segments and segments[0].t < source_end and all(not e.data["dropped"] for e in segments)
        end = cal.recorder.last_voiced_at or source_end
        english = (
            await asyncio.to_thread(backends.transcriber.transcribe, _window(cal, first - 0.2, end + 0.3))
        ).text.lower()
        # the interpreter's whisper base mishears espeak-ng's Spanish now and then, most often
        # its first clause ("Mañana tenemos una reunión" as "Mamiya Tenemosu, Real Yo -Nu",
        # "oficina" as "oficia"): half of the content words, not every one
        content = ("meeting", "office", "together", "restaurant", "afternoon", "museum")
        found = [w for w in content if w in english]
        assert len(found) >= 3, (english, [e.data for e in segments])
        # ben hears the original too: Spanish before the interpretation starts, then ducked under it
        before = _window(ben, t0, first)
        assert rms(before) > 0.01 and rms(_window(cal, t0, first - 0.1)) < 0.003
        # While the channel speaks over ana, what ben hears beyond cal's channel is her voice
        # ducked: far below her voice at full level (before the interpretation began).
        span = (first, source_end)
        ben_frames, cal_frames = (_frames(_window(c, *span)) for c in (ben, cal))
        n = min(ben_frames.size, cal_frames.size)
        busy = cal_frames[:n] > 0.02
        residual = np.sqrt(max(0.0, float(np.mean(ben_frames[:n][busy] ** 2 - cal_frames[:n][busy] ** 2))))
        full = rms(before)
        # 0.1 s of overlap at least: a slow run's interpretation began late (8 frames, residual 0)
        assert busy.sum() >= 5 and residual < 0.5 * full, (residual, full, int(busy.sum()))
        # ana never hears her own voice nor the English channel
        assert rms(_window(ana, t0, source_end)) < 0.003

        # English -> Spanish: ana hears Apertium's Spanish in espeak's voice.
        clip = speech(ENGLISH)
        t1 = await ben.say(clip, SR_OUT)
        await asyncio.sleep(clip.size / SR_OUT)
        spoken = await _interpreted(session, callers, t1, "es")
        said = " ".join(str(e.data["text"]).lower() for e in spoken)
        words = ("oficina", "nueva", "grande", "cocina", "ventana")
        # the translation has (nearly) all
        assert sum(w in said for w in words) >= 4, said
        # and ana hears exactly that speech, each segment soon after it was handed to the
        # channel. (Not whisper: base reads espeak-ng's Spanish under ben's ducked voice as
        # "la oficia puede ser un gran veto" one run and as nothing at all the next.)
        tts = session.room_audio.interpreter.kit.tts("es")
        kept = [e for e in spoken if not e.data["dropped"]]
        assert kept, [e.data for e in spoken]
        mix = session.room_audio.mix.listeners["ana"]
        for event in kept:
            chunks = await asyncio.to_thread(lambda e=event: list(tts.synthesize(str(e.data["text"]))))
            voice = resample(np.concatenate(chunks), tts.sample_rate, SAMPLE_RATE)
            lag, alike = _delivered(ana, voice, after=event.t)
            played = (event.t, event.t + lag + voice.size / SAMPLE_RATE)
            cut = sum(n for t, n in mix.cuts if played[0] <= t <= played[1])
            # The same waveform after Opus and the mix: ~0.97 here; ben's English original
            # 0.08-0.10, another Spanish sentence in the same voice with the same first words
            # 0.26. A loaded machine's stalls leave ana's mix behind the room's clock, and it
            # lets frames go to stay live (cut: ~150 one-frame cuts in a call with one core
            # kept busy); then the speech is chopped: 0.29-0.45 measured, other sentences
            # 0.09-0.15 in the same chopped windows.
            floor = 0.7 if cut == 0 else 0.25
            print(f"{event.data['text']!r}: alike {alike:.2f}, lag {lag:.2f} s, mix frames cut {cut}")
            assert alike > floor and lag < 2.0, (event.data["text"], lag, alike, cut)
    finally:
        for caller in callers:
            await caller.hangup()


async def test_a_declared_language_is_checked_at_the_offer(bot_factory) -> None:  # type: ignore[no-untyped-def]
    server = await bot_factory(interpret_languages=["en", "es", "fr"], translate_url="")
    cases = [
        ({"language": "klingon"}, "plain", r"400.*unknown_language"),
        ({"language": "de"}, "plain", r"400.*language_not_offered.*interpret_languages"),
        ({"language": "es"}, None, r"400.*interpreter_needs_a_room"),
    ]
    for kw, room, error in cases:
        caller = Caller(url=server.url, room=room, name="x", **kw)  # type: ignore[arg-type]
        try:
            with pytest.raises(CallError, match=error):
                await caller.connect()
        finally:
            await caller.close()
    # a French speaker alone is fine; the next English one has no fr-en translator here
    fr = await _join(server, "fr-room", "fra", language="fr")
    try:
        with pytest.raises(CallError, match=r"400.*language_unavailable.*translate_url"):
            await _join(server, "fr-room", "eng", language="en")
        assert len(server.manager.sessions) == 1  # the refusal took nothing down
    finally:
        await fr.hangup()


async def test_a_chromium_caller_picks_a_language_on_the_page(tmp_path: Path, bot_factory, spanish) -> None:  # type: ignore[no-untyped-def]
    from browser import launch_chromium, require_chromium

    require_chromium()
    mic = np.concatenate([np.zeros(SR_OUT * 2, np.float32), spanish, np.zeros(SR_OUT * 6, np.float32)])
    wav = tmp_path / "mic.wav"
    write_wav(str(wav), mic, SR_OUT)
    server: BotServer = await bot_factory()
    chromium = await launch_chromium(tmp_path, wav=wav)
    ben = None
    try:
        page = await chromium.new_page()
        await page.goto(server.url + "/?room=lingo")
        await page.wait_for_function("document.querySelectorAll('#language option').length > 2")
        await page.select_option("#mode", "audio")
        await page.select_option("#language", "es")
        await page.fill("#name", "maria")
        await page.click("#join")
        await page.wait_for_function("window.presence.peerId", timeout=20_000)
        ben = await _join(server, "lingo", "ben", language="en", original=False)
        session = next(iter(server.manager.sessions.values()))
        assert session.room_audio.interpreter is not None
        assert session.room_audio.interpreter.languages == {"maria": "es", "ben": "en"}
        event = await session.events.wait_for(Ev.INTERPRETATION_SEGMENT, timeout=40)
        assert event.data["speaker"] == "maria" and event.data["target_language"] == "en"
        for _ in range(100):
            if ben.recorder.first_voiced_at is not None:
                break
            await asyncio.sleep(0.1)
        assert ben.recorder.first_voiced_at is not None  # ben hears maria interpreted
    finally:
        if ben is not None:
            await ben.hangup()
        await chromium.close()


async def test_an_interpreter_that_falls_behind_drops_and_says_so(backends) -> None:  # type: ignore[no-untyped-def]
    """Nobody listens to the channel (nothing plays it out) while a speaker goes on: the
    interpreter keeps at most ``interpret_max_lag_s`` of speech waiting, never more."""
    from conftest import test_settings

    from presence.aio import interpret_executor
    from presence.bot.interpret.interpreter import QUEUE_SEGMENTS, Interpreter
    from presence.bot.interpret.stable import Word
    from presence.events import EventLog

    settings = test_settings(interpret_max_lag_s=4.0)
    events = EventLog("behind")
    channels: list = []
    interpreter = Interpreter(settings, backends.languages, events, channels.append, interpret_executor())
    interpreter.join("ana", "es")
    interpreter.join("ben", "en")
    try:
        for i in range(QUEUE_SEGMENTS + 4):
            text = f"La casa número {i} es muy grande, y tiene un jardín muy bonito."
            words = [Word(w, i * 4.0 + k * 0.3, i * 4.0 + k * 0.3 + 0.25) for k, w in enumerate(text.split())]
            interpreter._queue("ana", "es", "text", words)
        english = next(c for c in channels if c.language == "en")
        for _ in range(300):
            done = [e for e in events.history if e.name == Ev.INTERPRETATION_SEGMENT]
            if len(done) >= QUEUE_SEGMENTS + 4:
                break
            await asyncio.sleep(0.1)
        dropped = [e.data["dropped"] for e in done if e.data["dropped"]]
        assert len(done) >= QUEUE_SEGMENTS + 4, [e.data for e in done]
        assert dropped.count("behind") >= 4, dropped  # the queue's overflow, then the channel's
        assert english.backlog_s() <= settings.interpret_max_lag_s + 5.0  # one segment past the cap at most
    finally:
        await interpreter.close()
