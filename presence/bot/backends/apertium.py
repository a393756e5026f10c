"""Apertium, the offline rule-based translator (Debian's ``apertium`` and a pair such as
``apertium-eng-spa``): one pipeline kept alive per direction, fed one segment at a time."""

from __future__ import annotations

import logging
import os
import re
import select
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

from presence.bot.backends.errors import TranslationError
from presence.bot.backends.languages import LANGUAGES, BackendMissing, check_language

log = logging.getLogger(__name__)

MODES_DIRS = (Path("/usr/share/apertium/modes"), Path("/usr/local/share/apertium/modes"))
# Apertium names languages by ISO 639-3; the interpreter by ISO 639-1.
_APERTIUM_CODES = {
    "eng": "en", "spa": "es", "cat": "ca", "fra": "fr", "por": "pt", "glg": "gl", "ita": "it",
    "deu": "de", "oci": "oc", "ron": "ro", "nld": "nl", "eus": "eu", "nob": "no", "nno": "nn",
    "dan": "da", "swe": "sv", "isl": "is", "afr": "af", "rus": "ru", "ukr": "uk", "bel": "be",
    "pol": "pl", "ces": "cs", "slk": "sk", "bul": "bg", "mkd": "mk", "kaz": "kk", "tat": "tt",
    "tur": "tr", "ara": "ar", "mlt": "mt", "cym": "cy", "bre": "br", "hin": "hi", "urd": "ur",
    "ind": "id", "msa": "ms", "fin": "fi", "est": "et", "lav": "lv", "lit": "lt", "slv": "sl",
    "hrv": "hr", "srp": "sr", "bos": "bs", "sqi": "sq", "ell": "el", "heb": "he", "fas": "fa",
}  # fmt: skip
_TO_APERTIUM = {two: three for three, two in _APERTIUM_CODES.items()}


def _iso(code: str) -> str | None:
    code = _APERTIUM_CODES.get(code, code)
    return code if code in LANGUAGES else None


def _apertium_modes(modes_dirs: tuple[Path, ...] = MODES_DIRS) -> dict[tuple[str, str], Path]:
    """(source, target) -> mode file, from the installed ``LANG1-LANG2.mode`` files (variants such
    as ``spa-eng_US`` and helper modes such as ``eng-spa-tagger`` are left out)."""
    found: dict[tuple[str, str], Path] = {}
    for folder in modes_dirs:
        for mode in sorted(folder.glob("*.mode")) if folder.is_dir() else ():
            sides = mode.stem.split("-")
            if len(sides) == 2 and "_" not in mode.stem:
                source, target = _iso(sides[0]), _iso(sides[1])
                if source and target:
                    found.setdefault((source, target), mode)
    return found


def apertium_runs() -> bool:
    # apertium-wblank-mode (apertium >= 3.8) turns a mode into the null-flush pipeline used here.
    return shutil.which("apertium-wblank-mode") is not None and shutil.which("lt-proc") is not None


def available_pairs(modes_dirs: tuple[Path, ...] = MODES_DIRS) -> set[tuple[str, str]]:
    """The (source, target) pairs installed Apertium data can translate (a directory listing)."""
    return set(_apertium_modes(modes_dirs))


# Characters the Apertium stream format reserves: escaped, as apertium-destxt does. "~" cannot
# be escaped (a stage drops what follows it): a space instead.
_RESERVED = re.compile(r"([\\\[\]^$/@<>{}])")
_ESCAPED = re.compile(r"\\(.)")
# Unknown-word marks ("*", "#", "@" glued to the front of a word) that -n does not remove.
_MARKS = re.compile(r"(?<![\\\w])[*#@](?=\w)")


class ApertiumTranslator:
    """One long-lived Apertium pipeline per direction, in null-flush mode: each request is a text
    and a NUL, the answer ends with a NUL. ~3 ms a sentence warm, against ~0.2 s for a process per
    sentence. The ``apertium`` wrapper itself cannot serve (its text deformatter buffers until
    EOF), so the mode's own pipeline runs, with the deformatter's escaping done here."""

    name = "apertium"

    def __init__(
        self, source: str, target: str, *, timeout_s: float = 5.0, modes_dirs: tuple[Path, ...] = MODES_DIRS
    ) -> None:
        self.source, self.target = check_language(source), check_language(target)
        mode = _apertium_modes(modes_dirs).get((self.source, self.target))
        if mode is None:
            raise BackendMissing(
                f"Apertium has no {self.source}->{self.target} pair here", pair_hint(source, target)
            )
        self.mode = mode
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The pipeline's process group (its shell), None when none runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def load(self) -> None:
        """Start the pipeline and translate one word (the first request loads its dictionaries)."""
        self.translate("ok")

    def _start(self) -> subprocess.Popen[bytes]:
        try:
            pipeline = subprocess.run(
                ["apertium-wblank-mode", "-z", str(self.mode)], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as exc:
            raise BackendMissing(
                f"cannot read the Apertium mode {self.mode} ({exc})", "apt-get install apertium"
            ) from exc
        self._stderr = tempfile.TemporaryFile()
        # $1 = generation without unknown-word marks (apertium -u), $2 = tagger options (none).
        # A session of its own, so _stop can signal every stage; the shell traps TERM (a handler,
        # which exec'd stages do not inherit) so that it outlives them and reaps them: an
        # orphaned stage would stay a zombie under an init that does not reap.
        proc = subprocess.Popen(
            ["bash", "-c", f"trap : TERM; {pipeline}", "apertium", "-n", ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
        )
        log.info("apertium %s started (pid %d)", self.mode.stem, proc.pid)
        return proc

    def _stop(self, grace_s: float = 0.5) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                try:
                    if stream is not None:
                        stream.close()  # end of input: each stage finishes and exits in turn
                except OSError:
                    pass
            # Then a stuck pipeline is terminated, at last killed (a stopped stage ignores TERM).
            for signal, wait_s in ((0, grace_s), (15, 0.5), (9, None)):
                try:
                    if signal:
                        os.killpg(proc.pid, signal)
                        os.killpg(proc.pid, 18)  # SIGCONT: a stopped stage takes its TERM too
                    proc.wait(timeout=wait_s)
                    break
                except ProcessLookupError:
                    proc.wait()
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _errors(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read()[-300:].decode("utf-8", "replace").strip()

    def _request(self, proc: subprocess.Popen[bytes], payload: bytes) -> bytes:
        """Send one request and read its answer; EOFError when the pipeline has died."""
        assert proc.stdin is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        if select.select([fd], [], [], 0)[0]:  # output before a request: a stage died and flushed
            raise EOFError(f"apertium {self.mode.stem} is out of step")
        try:
            proc.stdin.write(payload)
            proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise EOFError("apertium's input is closed") from exc
        deadline = time.monotonic() + self.timeout_s
        answer = b""
        while not answer.endswith(b"\0"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._stop(grace_s=0)  # it may answer later: a fresh one keeps requests in step
                raise TranslationError(
                    f"apertium {self.mode.stem} gave no answer in {self.timeout_s:g} s", transient=True
                )
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"apertium {self.mode.stem} exited: {self._errors() or 'no message'}")
            answer += chunk
        # Every answer ends with the request's own "\n" and NUL; a NUL alone was flushed by a stage
        # whose upstream died.
        if not answer.endswith(b"\n\0") or b"\0" in answer[:-1]:
            raise EOFError(
                f"apertium {self.mode.stem} answered out of step: {self._errors() or answer[:80]!r}"
            )
        return answer[:-2]

    def translate(self, text: str) -> str:
        text = " ".join(text.replace("\0", " ").replace("~", " ").split())
        if not text:
            return ""
        # The trailing newline ends the last sentence: without it the analyser holds back a final
        # "." (it could start an abbreviation), and the bilingual stage waits for more.
        payload = _RESERVED.sub(r"\\\1", text).encode("utf-8") + b"\n\0"
        with self._lock:
            for attempt in (1, 2):
                proc = self._proc
                if proc is None or proc.poll() is not None:
                    self._stop()
                    proc = self._proc = self._start()
                try:
                    raw = self._request(proc, payload).decode("utf-8", "replace")
                    break
                except EOFError as exc:
                    self._stop()
                    if attempt == 2:
                        raise TranslationError(f"{exc} (twice in a row)") from exc
                    log.warning("%s; restarting it", exc)
        return " ".join(_ESCAPED.sub(r"\1", _MARKS.sub("", raw)).split())

    def close(self) -> None:
        with self._lock:
            self._stop()


def pair_hint(source: str, target: str) -> str:
    a, b = _TO_APERTIUM.get(source, source), _TO_APERTIUM.get(target, target)
    return (
        f"install an Apertium pair for it (apt-get install apertium-{a}-{b}, if Apertium has one), or set "
        "translate_url (an OpenAI-compatible endpoint) or translate_model (a transformers model)"
    )
