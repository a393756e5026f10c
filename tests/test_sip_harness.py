"""The SIP test harness (tests/sip_support.py) against the real peers alone, with no bot: baresip
records what it hears, kamailio registers and authenticates, and the sipp scenarios pass."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
from conftest import rms
from sip_peers import Kamailio, Sipp, audio_dtmf_scenario, cancel_scenario, options_scenario
from sip_support import Baresip, SipAccount, need_binary, sip_ping, speech_wav, ulaw_file

SAID = "Hello, this is the caller speaking. Please write down four five six."


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2), path
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32), w.getframerate()


def assert_voiced(path: Path, min_s: float, why: str) -> None:
    audio, rate = read_wav(path)
    level = rms(audio)
    assert audio.size / rate >= min_s and level > 500, (
        f"{path.name}: {audio.size / rate:.2f} s, RMS {level:.0f}\n{why}"
    )


async def test_baresip_callee_records_a_spoken_call_and_dtmf(tmp_path: Path) -> None:
    speech = await speech_wav(SAID, tmp_path / "said.wav")
    callee = Baresip(tmp_path, SipAccount("bob"), auto_answer=True)
    caller = Baresip(tmp_path, SipAccount("alice"), source=speech)
    async with callee, caller:
        await caller.dial(callee.uri)
        await callee.wait_established()
        await asyncio.sleep(0.5)
        await caller.send_dtmf("12")
        # The caller hangs up when its file ends (about 4 s).
        await callee.wait_call_closed(timeout=15)
        await caller.wait_call_closed()
    assert callee.dtmf_received() == "12", callee.transcript()
    assert_voiced(callee.received_wav(), 2.5, callee.transcript())
    assert_voiced(caller.sent_wav(), 2.5, caller.transcript())


async def test_g722_echo_callee_sends_back_what_it_hears(tmp_path: Path) -> None:
    speech = await speech_wav(SAID, tmp_path / "said.wav")  # 8 kHz: the harness resamples it to 16 kHz
    callee = Baresip(tmp_path, SipAccount("bob"), echo=True, codecs="G722", auto_answer=True)
    caller = Baresip(tmp_path, SipAccount("alice"), source=speech, silence_s=0.5, codecs="G722")
    async with callee, caller:
        await caller.dial(callee.uri)
        await caller.wait_line("Set audio decoder: G722")
        await caller.wait_call_closed(timeout=15)
    _, rate = read_wav(caller.received_wav())
    assert rate == 16000, caller.transcript()
    assert_voiced(caller.received_wav(), 2.5, caller.transcript() + callee.transcript())


async def test_kamailio_registers_with_digest_and_proxies_an_authenticated_call(tmp_path: Path) -> None:
    async with Kamailio(tmp_path, {"alice": "secret", "bob": "hunter2"}) as kam:
        alice = Baresip(tmp_path, SipAccount("alice", "secret", registrar=kam.address), auto_answer=True)
        mallory = Baresip(tmp_path, SipAccount("bob", "wrong", registrar=kam.address))
        async with alice, mallory:
            assert await alice.wait_registered(), alice.transcript()
            assert not await mallory.wait_registered(), mallory.transcript()
        # An INVITE is challenged with 407, retried with credentials and routed to alice's contact.
        alice = Baresip(
            tmp_path / "2", SipAccount("alice", "secret", registrar=kam.address), auto_answer=True
        )
        bob = Baresip(tmp_path / "2", SipAccount("bob", "hunter2", registrar=kam.address))
        async with alice, bob:
            assert await alice.wait_registered(), alice.transcript()
            await bob.dial(f"sip:alice@{kam.address}")
            await alice.wait_established()
            await bob.wait_established()
            await bob.hangup()
            await alice.wait_call_closed()
        log = kam.log()
    assert "presence-test: REGISTER" in log and "presence-test: INVITE" in log, log[-3000:]


async def test_sipp_options_against_kamailio(tmp_path: Path) -> None:
    async with Kamailio(tmp_path, {"alice": "secret"}) as kam:
        assert (await sip_ping(kam.port) or "").startswith("SIP/2.0 200"), kam.log()
        result = await Sipp(tmp_path).run(options_scenario(), kam.address, timeout=10)
    assert result.rc == 0, result.explain()


async def test_sipp_cancels_a_ringing_baresip(tmp_path: Path) -> None:
    async with Baresip(tmp_path, SipAccount("bob")) as callee:  # rings, never answers
        result = await Sipp(tmp_path).run(cancel_scenario(), callee.address, timeout=10)
        assert result.rc == 0, result.explain() + callee.transcript()
        await callee.wait_call_closed()
    assert not any(Baresip.ESTABLISHED.search(line) for line in callee.lines), callee.transcript()


async def test_sipp_streams_mulaw_audio_and_dtmf_to_baresip(tmp_path: Path) -> None:
    need_binary("sipp")
    ulaw = await ulaw_file(await speech_wav(SAID, tmp_path / "said.wav"), tmp_path / "said.ul")
    async with Baresip(tmp_path, SipAccount("bob"), auto_answer=True) as callee:
        scenario = audio_dtmf_scenario(ulaw, audio_ms=2500, hold_ms=800)
        result = await Sipp(tmp_path).run(scenario, callee.address, timeout=15)
        assert result.rc == 0, result.explain() + callee.transcript()
        await callee.wait_call_closed()
    assert callee.dtmf_received() == "1", callee.transcript()
    assert_voiced(callee.received_wav(), 2.0, callee.transcript())
