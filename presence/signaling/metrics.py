"""Prometheus metrics of one server: a private registry so apps (and tests) never collide.

Signaling counts requests and rejected offers; the bot observes the latency histograms and
the micro-turn counter through the same :class:`Metrics` (``app[METRICS_KEY]``), and may
register further collectors on ``metrics.registry``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Buckets sized for what each measures: a reply lands in hundreds of ms, a barge-in stop in
# tens, and one micro-turn step must stay far below the 200 ms micro-turn.
VOICE_TO_VOICE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)
BARGE_IN_BUCKETS = (0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
MICROTURN_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
# A background job: milliseconds of queueing overhead up to a think job's tens of seconds.
JOB_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
# How late the event loop runs a timer: past ~0.5 s, ICE consent checks (aioice waits 500 ms for
# each answer) start to fail, and six in a row end a call.
LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass(frozen=True, slots=True)
class Metrics:
    registry: CollectorRegistry
    http_requests: Counter  # presence_http_requests_total{route,status}
    calls_active: Gauge  # presence_calls_active (reads the host on every scrape)
    offers_rejected: Counter  # presence_offers_rejected_total{code}
    voice_to_voice: Histogram  # presence_voice_to_voice_seconds
    barge_in_stop: Histogram  # presence_barge_in_stop_seconds
    microturn_step: Histogram  # presence_microturn_step_seconds
    microturns: Counter  # presence_microturns_total
    # background jobs, kept current by presence.bot.jobs.bridge.JobBridge
    job_queue_depth: Gauge  # presence_job_queue_depth{kind}
    job_latency: Histogram  # presence_job_latency_seconds (dispatch -> result delivered)
    job_retries: Counter  # presence_job_retries_total
    job_dead_letters: Counter  # presence_job_dead_letters_total
    loop_lag: Histogram  # presence_event_loop_lag_seconds (presence.aio.watch_loop_lag)

    @classmethod
    def create(cls, active_calls: Callable[[], float] | None = None) -> Metrics:
        """A fresh registry with every Presence metric; ``active_calls`` feeds the gauge."""
        registry = CollectorRegistry(auto_describe=True)
        calls_active = Gauge("presence_calls_active", "Calls in progress", registry=registry)
        if active_calls is not None:
            calls_active.set_function(active_calls)
        return cls(
            registry=registry,
            http_requests=Counter(
                "presence_http_requests",
                "HTTP requests by route template and status",
                ["route", "status"],
                registry=registry,
            ),
            calls_active=calls_active,
            offers_rejected=Counter(
                "presence_offers_rejected",
                "Offers answered with an error, by error code",
                ["code"],
                registry=registry,
            ),
            voice_to_voice=Histogram(
                "presence_voice_to_voice_seconds",
                "Caller speech end to first bot audio packet sent",
                buckets=VOICE_TO_VOICE_BUCKETS,
                registry=registry,
            ),
            barge_in_stop=Histogram(
                "presence_barge_in_stop_seconds",
                "Caller speech onset over the bot to bot output stopped",
                buckets=BARGE_IN_BUCKETS,
                registry=registry,
            ),
            microturn_step=Histogram(
                "presence_microturn_step_seconds",
                "Processing time of one micro-turn decision",
                buckets=MICROTURN_STEP_BUCKETS,
                registry=registry,
            ),
            microturns=Counter(
                "presence_microturns",
                "Micro-turns decided",
                registry=registry,
            ),
            job_queue_depth=Gauge(
                "presence_job_queue_depth",
                "Background jobs queued or running, by kind",
                ["kind"],
                registry=registry,
            ),
            job_latency=Histogram(
                "presence_job_latency_seconds",
                "Background job dispatch to its result delivered to the call",
                buckets=JOB_LATENCY_BUCKETS,
                registry=registry,
            ),
            job_retries=Counter(
                "presence_job_retries",
                "Background job re-runs: transient failures, reclaims from dead workers, resubmits",
                registry=registry,
            ),
            job_dead_letters=Counter(
                "presence_job_dead_letters",
                "Background jobs or entries given up on and dead-lettered",
                registry=registry,
            ),
            loop_lag=Histogram(
                "presence_event_loop_lag_seconds",
                "How late the event loop woke a timer (its other work held it up)",
                buckets=LOOP_LAG_BUCKETS,
                registry=registry,
            ),
        )

    def render(self) -> bytes:
        """The text exposition format of every metric in this registry."""
        return generate_latest(self.registry)
