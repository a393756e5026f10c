"""Phone calls with real SIP peers: baresip (a softphone), sipp and kamailio, on loopback.

The callers' voices are piper's; what a phone heard is baresip's own recording of the call,
transcribed by the offline whisper.
"""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import SR_OUT, BotServer, bot_heard, heard_as
from sip_peers import (
    Kamailio,
    Sipp,
    audio_dtmf_scenario,
    cancel_scenario,
    hold_scenario,
    silent_caller_scenario,
)
from sip_support import Baresip, SipAccount, ulaw_file

from presence.events import Ev
from presence.media.audio import resample
from presence.seams import SAMPLE_RATE

pytestmark = pytest.mark.slow


def _phone_wav(
    path: Path, audio48: np.ndarray, before_s: float = 1.5, after_s: float = 12.0, rate: int = 8000
) -> Path:
    """Mono s16 at the codec's rate (baresip's aufile wants it: 16 kHz for G.722): silence,
    the speech, silence (the call hangs up when the file ends: the tail keeps it up)."""
    voice = resample(audio48, SR_OUT, rate)
    audio = np.concatenate(
        [np.zeros(int(rate * before_s), np.float32), voice, np.zeros(int(rate * after_s), np.float32)]
    )
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        rate, data = w.getframerate(), w.readframes(w.getnframes())
        channels = w.getnchannels()
    audio = np.frombuffer(data, "<i2").astype(np.float32) / 32768
    return (audio.reshape(-1, channels).mean(axis=1) if channels > 1 else audio), rate


async def _heard(backends, path: Path) -> str:  # type: ignore[no-untyped-def]
    for _ in range(40):  # baresip writes the WAV header as the call closes: a moment after its log says so
        try:
            audio, rate = _read_wav(path)
            break
        except (wave.Error, EOFError):
            await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"{path} never became a readable WAV")
    assert audio.size > rate, f"the phone recorded {audio.size / rate:.2f} s"
    audio16 = resample(audio, rate, SAMPLE_RATE)
    return (await asyncio.to_thread(backends.transcriber.transcribe, audio16)).text.lower()


async def _one_session(server: BotServer, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.05)):
        if server.manager.sessions:
            return next(iter(server.manager.sessions.values()))
        await asyncio.sleep(0.05)
    raise AssertionError("no call started")


async def _ended(server: BotServer, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if not server.manager.sessions:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the call did not end: {list(server.manager.sessions)}")


@pytest.mark.parametrize(("codec", "rate"), [("PCMU", 8000), ("G722/16000/1", 16000)])
async def test_a_phone_calls_the_bot_and_hears_its_answer(
    bot_factory, speech, backends, tmp_path, codec, rate
) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory(sip_port=0, greeting="Hello, this is Presence.")
    wav = _phone_wav(tmp_path / "question.wav", speech("What is your name?"), before_s=3.0, rate=rate)
    async with Baresip(tmp_path, SipAccount("alice"), source=wav, codecs=codec) as phone:
        await phone.dial(f"sip:presence@127.0.0.1:{server.settings.sip_port}")
        await phone.wait_established()
        session = await _one_session(server)
        call = next(iter(session.peers.values())).link
        assert call.rtp.codec.name == codec.split("/")[0], call.rtp.codec
        greeted = await session.events.wait_for(Ev.BOT_SPEECH_END, timeout=20)
        try:
            await session.events.wait_for(Ev.BOT_SPEECH_END, after=greeted.t + 0.01, timeout=40)
        except TimeoutError:
            pytest.fail(f"no answer to the question; the bot heard {bot_heard(session)}")
        await asyncio.sleep(0.5)  # the tail in flight
        await phone.hangup()
        await phone.wait_call_closed()
        await _ended(server)  # the BYE ended the call on our side
        said = [m.content for m in session.engine.history if m.role == "assistant"]
        joined = session.events.first(Ev.PARTICIPANT_JOINED)
        assert (
            joined is not None and joined.data["transport"] == "sip" and joined.data["participant"] == "alice"
        )
        text = await _heard(backends, phone.received_wav())
    # the greeting, then the answer (whatever the LLM made of the narrowband question)
    assert len(said) == 2 and "prese" in text, (text, said)
    assert heard_as(text, " ".join(said), 0.6), f"the phone heard {text!r}; the bot said {said!r}"


async def test_dtmf_keys_reach_the_engine_as_events(bot_factory, speech, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory(sip_port=0)
    ulaw = await ulaw_file(
        _phone_wav(tmp_path / "hello.wav", speech("Hello."), 0.2, 0.3), tmp_path / "hello.ul"
    )
    run = asyncio.create_task(
        Sipp(tmp_path).run(
            audio_dtmf_scenario(ulaw, audio_ms=1000, hold_ms=4000), f"127.0.0.1:{server.settings.sip_port}",
            service="presence", timeout=30,
        )
    )  # fmt: skip
    session = await _one_session(server)
    pressed = await session.events.wait_for(Ev.DTMF, timeout=20)
    result = await run
    assert result.rc == 0, result.explain()
    digits = [e.data["digit"] for e in session.events.named(Ev.DTMF)]
    assert digits == ["1"], digits  # once, though its end packet came three times
    assert pressed.data["participant"] == "sipp"
    await _ended(server)


async def test_cancel_before_the_answer_ends_the_ringing_call(bot_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory(sip_port=0, sip_answer_after_ms=3000)
    result = await Sipp(tmp_path).run(
        cancel_scenario(ring_ms=300), f"127.0.0.1:{server.settings.sip_port}", service="presence", timeout=15
    )
    assert result.rc == 0, result.explain()
    await asyncio.sleep(3.5)  # past the ring: nothing may answer or start now
    assert not server.manager.sessions and not server.manager.ended
    assert server.sip is not None and not server.sip.calls


async def test_the_bot_dials_a_phone_and_a_barge_in_stops_its_audio(
    bot_factory, speech, backends, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    greeting = (
        "Hello, this is Presence calling about your appointment next week. I have a few details "
        "to go through with you, so please bear with me while I read them all out slowly."
    )
    server: BotServer = await bot_factory(sip_port=0, greeting=greeting)
    interruption = speech("Wait, stop. I have a question.")
    wav = _phone_wav(tmp_path / "stop.wav", interruption, before_s=3.0, after_s=8.0)
    async with Baresip(tmp_path, SipAccount("bob"), source=wav, auto_answer=True) as phone:
        assert server.sip is not None
        call = await server.sip.dial(phone.uri)
        session = server.manager.sessions[call.call_id]
        start = await session.events.wait_for(Ev.BOT_SPEECH_START, timeout=20)
        try:
            flushed = await session.events.wait_for(Ev.PLAYBACK_FLUSHED, after=start.t, timeout=20)
        except TimeoutError:
            pytest.fail(
                f"no barge-in: {[(e.name, round(e.t - start.t, 2), e.data) for e in session.events.history if e.name not in ('state', 'latency')]}"
            )
        await asyncio.sleep(2.0)
        sent_after = call.rtp.packets_out
        await phone.hangup()
        await phone.wait_call_closed()
        heard, rate = _read_wav(phone.received_wav())
    # the phone's recording starts at the answer, as the greeting does (within a packet or two)
    onset = 3.0
    frames = heard[: heard.size // (rate // 50) * (rate // 50)].reshape(-1, rate // 50)
    level = 20 * np.log10(np.sqrt((frames**2).mean(axis=1)) + 1e-9)
    t = np.arange(level.size) * 0.02
    loud_before = (level[(t > 0.5) & (t < onset)] > -40).mean()
    loud_after = (level[(t > onset + 1.2) & (t < onset + 2.5)] > -40).mean()
    assert loud_before > 0.5, f"the greeting was not heard: {loud_before:.2f} of frames voiced"
    assert loud_after < 0.1, f"the bot kept talking after the barge-in: {loud_after:.2f} of frames voiced"
    assert flushed.t - start.t < onset + 2.0, flushed
    assert sent_after > 0


async def test_the_bot_registers_and_a_phone_reaches_it_through_the_registrar(
    bot_factory, speech, backends, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    users = {"presence": "botsecret", "carol": "carolsecret"}
    async with Kamailio(tmp_path, users) as proxy:
        wrong: BotServer = await bot_factory(
            sip_port=0, sip_registrar=f"sip:{proxy.address}", sip_password="not-it", sip_user="presence"
        )
        server: BotServer = await bot_factory(
            sip_port=0, sip_registrar=f"sip:{proxy.address}", sip_password="botsecret", sip_user="presence",
            greeting="Hello, you have reached Presence.", sip_register_expires_s=10,
        )  # fmt: skip
        assert server.sip is not None and server.sip.registration is not None
        await asyncio.wait_for(server.sip.registration.registered.wait(), 10)
        assert wrong.sip is not None and wrong.sip.registration is not None
        for _ in range(100):
            if wrong.sip.registration.last_error:
                break
            await asyncio.sleep(0.05)
        assert not wrong.sip.registration.registered.is_set()
        assert "403" in wrong.sip.registration.last_error or "401" in wrong.sip.registration.last_error
        wav = _phone_wav(tmp_path / "quiet.wav", np.zeros(100, np.float32), 0.0, 8.0)
        account = SipAccount("carol", password="carolsecret", registrar=proxy.address)
        async with Baresip(tmp_path, account, source=wav) as phone:
            await phone.dial(f"sip:presence@{proxy.address}")
            await phone.wait_established(timeout=15)
            session = await _one_session(server)
            await session.events.wait_for(Ev.BOT_SPEECH_END, timeout=30)
            await asyncio.sleep(0.5)
            await phone.hangup()
            await phone.wait_call_closed()
            text = await _heard(backends, phone.received_wav())
        assert "reached" in text or "presence" in text, text
        assert not wrong.manager.sessions and not wrong.manager.ended
        for _ in range(200):  # 10 s granted: renewed at 8 s
            if server.sip.registration.count >= 2:
                break
            await asyncio.sleep(0.05)
        assert server.sip.registration.count >= 2, server.sip.registration.last_error


async def test_a_quiet_caller_is_checked_on_then_the_bot_hangs_up(bot_factory, backends, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory(sip_port=0, idle_prompt_s=2.0, idle_hangup_s=2.0)
    wav = _phone_wav(tmp_path / "quiet.wav", np.zeros(100, np.float32), 0.0, 30.0)
    async with Baresip(tmp_path, SipAccount("dave"), source=wav) as phone:
        await phone.dial(f"sip:presence@127.0.0.1:{server.settings.sip_port}")
        await phone.wait_established()
        session = await _one_session(server)
        await phone.wait_call_closed(timeout=30)  # the bot's BYE, long before the file ends
        said = [e.data.get("text") for e in session.events.named(Ev.CAPTION) if e.data.get("who") == "bot"]
        text = await _heard(backends, phone.received_wav())
    await _ended(server)
    assert "still there" in text and "goodbye" in text, (text, said)


async def test_a_caller_who_presses_0_is_transferred_to_a_person(bot_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with Baresip(tmp_path, SipAccount("person"), auto_answer=True) as person:
        server: BotServer = await bot_factory(sip_port=0, transfer_to=person.uri)
        wav = _phone_wav(tmp_path / "quiet.wav", np.zeros(100, np.float32), 0.0, 30.0)
        async with Baresip(tmp_path, SipAccount("erin"), source=wav) as phone:
            await phone.dial(f"sip:presence@127.0.0.1:{server.settings.sip_port}")
            await phone.wait_established()
            session = await _one_session(server)
            await asyncio.sleep(0.5)
            await phone.send_dtmf("0")
            moved = await session.events.wait_for(Ev.TRANSFER, timeout=30)
            assert moved.data["ok"] is True, moved
            await person.wait_established(timeout=10)  # Erin's phone called the person itself
            said = [m.content for m in session.engine.history if m.role == "assistant"]
            assert any("person" in s for s in said), said
        await _ended(server)  # the bot's leg ended once the person answered


async def test_a_re_invite_holds_and_resumes_the_call(bot_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory(sip_port=0)
    run = asyncio.create_task(
        Sipp(tmp_path).run(
            hold_scenario(hold_ms=1500), f"127.0.0.1:{server.settings.sip_port}", service="presence"
        )
    )
    session = await _one_session(server)
    call = next(iter(session.peers.values())).link
    held = False
    for _ in range(100):  # the hold is between the two re-INVITEs
        held = held or call.held
        if run.done():
            break
        await asyncio.sleep(0.05)
    result = await run
    assert result.rc == 0, result.explain()
    assert held and not call.held
    await _ended(server)


async def test_a_caller_whose_media_stops_is_hung_up_with_a_bye(bot_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server: BotServer = await bot_factory(sip_port=0, peer_timeout_s=3.0)
    started = asyncio.get_running_loop().time()
    result = await Sipp(tmp_path).run(
        silent_caller_scenario(wait_ms=15_000),
        f"127.0.0.1:{server.settings.sip_port}",
        service="presence",
        timeout=25,
    )
    assert result.rc == 0, result.explain()  # the BYE came, and was answered
    took = asyncio.get_running_loop().time() - started
    assert 3.0 <= took < 12.0, took
    await _ended(server)
