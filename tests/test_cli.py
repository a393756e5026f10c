"""The command line as users run it: ``presence serve`` in a process, ``presence call`` against it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import heard_as

from presence.media.audio import read_wav, write_wav

pytestmark = pytest.mark.slow


def run_cli(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "presence.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_help_explains_every_command() -> None:
    out = run_cli("--help").stdout
    for command in ("serve", "call", "worker", "bench"):
        assert command in out
    serve_help = run_cli("serve", "--help").stdout
    assert "--eot-silence-ms" in serve_help and "PRESENCE_" in serve_help


def test_bad_settings_are_a_clear_error() -> None:
    result = run_cli("serve", "--micro-turn-ms", "150")
    assert result.returncode == 2 and "micro_turn_ms must be a positive multiple of 20" in result.stderr
    env = {**os.environ, "PRESENCE_PORT": "eighty"}
    result = run_cli("serve", env=env)
    assert result.returncode == 2 and "cannot read 'eighty' as int" in result.stderr


def test_serve_refuses_an_open_address_without_a_token_secret() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    out = run_cli("serve", "--host", "0.0.0.0", "--port", "0", env=env)
    assert out.returncode != 0
    assert "refusing to listen on 0.0.0.0 without a token secret" in out.stderr
    assert "PRESENCE_TOKEN_SECRET" in out.stderr and "loading models" not in out.stdout


def test_serve_then_call_from_the_command_line(tmp_path: Path, speech, backends) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "PRESENCE_PORT": "0", "PRESENCE_GREETING": "", "PRESENCE_JOBS": "off"}
    server = subprocess.Popen(
        [sys.executable, "-m", "presence.cli", "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = None
        deadline = time.monotonic() + 120
        assert server.stdout is not None
        while time.monotonic() < deadline and url is None:
            line = server.stdout.readline()
            if not line:
                break
            match = re.search(r"Open this URL to call the bot: (\S+)", line)
            url = match.group(1) if match else None
        assert url, "presence serve did not print its URL"
        wav, out = tmp_path / "question.wav", tmp_path / "answer.wav"
        write_wav(str(wav), speech("What is your name?"), 48_000)
        events = tmp_path / "events.jsonl"
        result = run_cli(
            "call",
            url,
            "--wav",
            str(wav),
            "--record",
            str(out),
            "--events",
            str(events),
            "--tail",
            "10",
            timeout=90,
        )
        assert result.returncode == 0, result.stderr
        assert "recorded" in result.stdout
        captions = [e for e in map(json.loads, events.read_text().splitlines()) if e.get("name") == "caption"]
        said = " ".join(e["text"] for e in captions if e.get("who") == "bot")
        asked = " ".join(  # the streaming ASR's text, which the reply answered (not whisper's later one)
            e["text"] for e in captions if e.get("who") == "caller" and e.get("final") and "pass_" not in e
        )
        assert said, f"no answer; the caller printed: {result.stdout}"
        # The bot knows its name, when its ASR heard the question (once: "what is sure name").
        if "your name" in asked.lower():
            assert "presence" in said.lower(), f"bot captions {said!r}; the caller printed: {result.stdout}"
        audio, _ = read_wav(str(out), 16_000)
        text = backends.transcriber.transcribe(audio).text
        assert heard_as(text, said), f"recorded {text!r}, the bot said {said!r}"
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_call_to_nowhere_fails_cleanly(tmp_path: Path) -> None:
    result = run_cli("call", "http://127.0.0.1:9", "--duration", "1", timeout=60)
    assert result.returncode == 2 and "call failed" in result.stderr


def test_settings_shown_in_logs_mask_secrets_and_url_passwords() -> None:
    from presence.config import Settings

    settings = Settings.from_env(
        {}, token_secret="s3cret-value", redis_url="redis://:hunter2@10.0.0.5:6379/0", llm_api_key="sk-abc"
    )
    shown = settings.public_dict()
    assert shown["token_secret"] == "***" and shown["llm_api_key"] == "***"
    assert shown["redis_url"] == "redis://:***@10.0.0.5:6379/0"
    assert "hunter2" not in repr(shown) and "s3cret" not in repr(shown)
    assert shown["host"] == settings.host  # everything else as it is


@pytest.mark.parametrize(("choice", "module"), [("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_serve_runs_on_the_chosen_event_loop(choice: str, module: str) -> None:
    """uvloop by default: it reads many datagrams per wake-up (see presence.aio.run)."""
    import asyncio

    from presence import aio
    from presence.config import Settings

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert Settings().event_loop == "uvloop"
    assert aio.run(loop_module(), choice) == module
