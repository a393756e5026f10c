"""The typed records of the job layer and their JSON wire form.

A request travels as one stream field ``job`` holding JSON; a result likewise as ``result``.
Parsing validates everything a worker or a caller relies on and raises :class:`JobError` with
a message that names the field, so a bad entry ends in the dead-letter stream with a reason.
"""

from __future__ import annotations

import enum
import json
import math
import re
import time
import uuid
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_MAX_ARGS_BYTES = 64 * 1024
# The kinds a stock worker serves; ``noop``/``echo`` are for health checks (see ``basic.py``).
BUILTIN_KINDS: frozenset[str] = frozenset({"search", "code", "think", "noop", "echo"})
# Only for tests and benchmarks: a worker serves them only when told to (``test_kinds``).
TEST_KINDS: frozenset[str] = frozenset({"sleep", "fail"})

# Ids end up inside Redis key names, so keep them to a safe, bounded alphabet.
_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class JobError(Exception):
    """A job could not be accepted, parsed or run; the message says why."""


class TransientJobError(JobError):
    """A failure worth retrying (a backend hiccup); the worker retries up to ``max_attempts``."""


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


def error_tag(error: str | None) -> str:
    """What a failure's error says it is: the word before its first colon ("dead" of "dead: ...",
    never of "deadline ..."), else ""."""
    tag, colon, _ = (error or "").partition(":")
    return tag.strip() if colon else ""


def new_job_id() -> str:
    return uuid.uuid4().hex


def check_id(value: object, name: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise JobError(f"{name} must be 1-128 characters of [A-Za-z0-9_.:-], got {value!r:.80}")
    return value


def check_kind(value: object, kinds: Collection[str] | None) -> str:
    if not isinstance(value, str) or not _KIND_RE.match(value):
        raise JobError(f"kind must be a lowercase identifier, got {value!r:.80}")
    if kinds is not None and value not in kinds:
        raise JobError(f"unknown kind {value!r}; known: {', '.join(sorted(kinds))}")
    return value


def _load_object(raw: str | bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JobError(f"malformed {what}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise JobError(f"malformed {what}: expected a JSON object, got {type(data).__name__}")
    return data


def _number(data: dict[str, Any], key: str, what: str) -> float:
    value = data.get(key)
    # bool is an int subclass; a JSON true is never a valid time
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise JobError(f"malformed {what}: {key} must be a finite number, got {value!r:.40}")
    return float(value)


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One unit of background work for a call. ``deadline`` is unix time (seconds)."""

    job_id: str
    call_id: str
    kind: str
    args: dict[str, Any]
    deadline: float
    urgent: bool = False
    attempt: int = 0

    @classmethod
    def new(
        cls,
        call_id: str,
        kind: str,
        args: dict[str, Any] | None = None,
        *,
        timeout_s: float = 30.0,
        urgent: bool = False,
        job_id: str | None = None,
    ) -> JobRequest:
        return cls(
            job_id=job_id or new_job_id(),
            call_id=call_id,
            kind=kind,
            args=dict(args or {}),
            deadline=time.time() + timeout_s,
            urgent=urgent,
        )

    def validate(
        self,
        *,
        kinds: Collection[str] | None = BUILTIN_KINDS,
        max_args_bytes: int = DEFAULT_MAX_ARGS_BYTES,
    ) -> JobRequest:
        check_id(self.job_id, "job_id")
        check_id(self.call_id, "call_id")
        check_kind(self.kind, kinds)
        if not isinstance(self.args, dict):
            raise JobError(f"args must be a JSON object, got {type(self.args).__name__}")
        try:
            size = len(json.dumps(self.args, separators=(",", ":")).encode())
        except (TypeError, ValueError) as exc:
            raise JobError(f"args are not JSON-serializable: {exc}") from None
        if size > max_args_bytes:
            raise JobError(f"args too large: {size} bytes > limit {max_args_bytes}")
        if not math.isfinite(self.deadline):
            raise JobError("deadline must be a finite unix time")
        if not isinstance(self.attempt, int) or self.attempt < 0:
            raise JobError(f"attempt must be a non-negative int, got {self.attempt!r}")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(
        cls,
        raw: str | bytes,
        *,
        kinds: Collection[str] | None = BUILTIN_KINDS,
        max_args_bytes: int = DEFAULT_MAX_ARGS_BYTES,
    ) -> JobRequest:
        data = _load_object(raw, "job request")
        missing = [k for k in ("job_id", "call_id", "kind", "args", "deadline") if k not in data]
        if missing:
            raise JobError(f"malformed job request: missing {', '.join(missing)}")
        urgent = data.get("urgent", False)
        attempt = data.get("attempt", 0)
        if not isinstance(urgent, bool):
            raise JobError(f"malformed job request: urgent must be a bool, got {urgent!r:.40}")
        if isinstance(attempt, bool) or not isinstance(attempt, int):
            raise JobError(f"malformed job request: attempt must be an int, got {attempt!r:.40}")
        request = cls(
            job_id=data["job_id"],
            call_id=data["call_id"],
            kind=data["kind"],
            args=data["args"],
            deadline=_number(data, "deadline", "job request"),
            urgent=urgent,
            attempt=attempt,
        )
        return request.validate(kinds=kinds, max_args_bytes=max_args_bytes)

    def retry(self) -> JobRequest:
        return JobRequest(
            self.job_id, self.call_id, self.kind, self.args, self.deadline, self.urgent, self.attempt + 1
        )


@dataclass(frozen=True, slots=True)
class JobResult:
    """The outcome of one job. ``value`` is the handler's dict (or a short text) when ``ok``."""

    job_id: str
    call_id: str
    kind: str
    ok: bool
    value: dict[str, Any] | str = field(default_factory=dict)
    error: str | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    worker: str = ""

    @property
    def status(self) -> JobStatus:
        if self.ok:
            return JobStatus.DONE
        tag = error_tag(self.error)
        if tag == "cancelled":
            return JobStatus.CANCELLED
        return JobStatus.DEAD if tag == "dead" else JobStatus.FAILED

    @classmethod
    def failure(
        cls, request: JobRequest, error: str, *, worker: str = "", started_at: float = 0.0
    ) -> JobResult:
        now = time.time()
        return cls(
            job_id=request.job_id,
            call_id=request.call_id,
            kind=request.kind,
            ok=False,
            value={},
            error=error,
            started_at=started_at or now,
            finished_at=now,
            worker=worker,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, raw: str | bytes) -> JobResult:
        data = _load_object(raw, "job result")
        missing = [k for k in ("job_id", "call_id", "kind", "ok") if k not in data]
        if missing:
            raise JobError(f"malformed job result: missing {', '.join(missing)}")
        if not isinstance(data["ok"], bool):
            raise JobError("malformed job result: ok must be a bool")
        value = data.get("value", {})
        if not isinstance(value, dict | str):
            raise JobError("malformed job result: value must be an object or a string")
        error = data.get("error")
        if error is not None and not isinstance(error, str):
            raise JobError("malformed job result: error must be a string or null")
        return cls(
            job_id=check_id(data["job_id"], "job_id"),
            call_id=check_id(data["call_id"], "call_id"),
            kind=str(data["kind"]),
            ok=data["ok"],
            value=value,
            error=error,
            started_at=_number(data, "started_at", "job result") if "started_at" in data else 0.0,
            finished_at=_number(data, "finished_at", "job result") if "finished_at" in data else 0.0,
            worker=str(data.get("worker", "")),
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry of the dead-letter stream: the raw payload and why it was given up on."""

    entry_id: str
    error: str
    payload: str
    source: str
    job_id: str | None = None
    kind: str | None = None
    at: float = 0.0
