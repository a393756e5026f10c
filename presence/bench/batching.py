"""How many calls one forward of the interaction model serves: ``presence bench batching``.

A real server (``policy=model``) takes ``--calls`` callers, joined at random moments
(as calls arrive), once with every call's micro-turns on one shared 200 ms grid
(``microturn_grid``, the default) and once with each call ticking from its own start. The
server's ``presence_model_batch_size`` histogram over ``--seconds`` (read from ``/metrics``)
gives the calls served per forward, and the micro-turn step time. The callers stay silent: the
model steps every micro-turn of every call, speech or not, so silence measures the clock
alone. ``--transport twilio`` (the default) calls through Twilio media websockets, whose
callers cost this process little (8 kHz mu-law, no DTLS, SRTP or Opus), so most of the cores
go to the server; ``webrtc`` uses aiortc peers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from presence import aio
from presence.bench.latency import start_bot
from presence.caller import Caller
from presence.config import Settings
from presence.provider_caller import TwilioCaller


@dataclass
class Histogram:
    """A scraped Prometheus histogram: cumulative bucket counts, their sum and count."""

    buckets: dict[float, float] = field(default_factory=dict)
    total: float = 0.0
    count: float = 0.0

    def minus(self, other: Histogram) -> Histogram:
        return Histogram(
            {le: n - other.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.total - other.total,
            self.count - other.count,
        )

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding quantile ``q`` (nan when empty)."""
        if self.count <= 0:
            return float("nan")
        for le in sorted(self.buckets):
            if self.buckets[le] >= q * self.count:
                return le
        return float("inf")


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, Histogram]:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, Histogram] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        h = out.setdefault(family.name, Histogram())
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                h.buckets[float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                h.total = sample.value
            elif sample.name.endswith("_count"):
                h.count = sample.value
    return out


@dataclass
class Run:
    grid: bool
    calls: int
    joined: int = 0
    batch: Histogram = field(default_factory=Histogram)
    step: Histogram = field(default_factory=Histogram)

    def row(self) -> str:
        b = self.batch
        mean = b.total / b.count if b.count else float("nan")
        full = b.count - b.buckets.get(float(self.calls - 1), 0.0) if b.count else 0.0
        return (
            f"| {'one grid' if self.grid else 'own phase'} | {self.joined}/{self.calls} | {b.count:.0f} | "
            f"{mean:.1f} | {b.quantile(0.5):g} | {100 * full / b.count if b.count else 0:.0f} % | "
            f"{1000 * self.step.quantile(0.5):g} / {1000 * self.step.quantile(0.95):g} |"
        )


async def measure(grid: bool, args: argparse.Namespace) -> Run:
    run = Run(grid, args.calls)
    bot = await start_bot(
        Settings(),
        policy="model",
        microturn_grid=grid,
        greeting="",
        max_calls=args.calls + 2,
        offer_burst=args.calls + 5,
        responder="rules",
    )
    callers: list[Caller | TwilioCaller] = [
        Caller(url=bot.url, name=f"batch-{i}") if args.transport == "webrtc" else TwilioCaller(url=bot.url)
        for i in range(args.calls)
    ]
    rng = random.Random(args.seed)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for caller in callers:
                await asyncio.sleep(rng.uniform(0.05, 0.35))  # calls arrive at any phase
                await caller.connect()
                run.joined += 1
            await asyncio.sleep(3.0)  # the last joins settle
            before = await scrape(http, bot.url)
            await asyncio.sleep(args.seconds)
            after = await scrape(http, bot.url)
        run.batch = after["presence_model_batch_size"].minus(
            before.get("presence_model_batch_size", Histogram())
        )
        run.step = after["presence_microturn_step_seconds"].minus(
            before.get("presence_microturn_step_seconds", Histogram())
        )
    finally:
        await asyncio.gather(*(c.hangup() for c in callers), return_exceptions=True)
        await bot.stop()
    return run


async def run_all(args: argparse.Namespace) -> int:
    print(
        f"presence bench batching: {args.calls} silent {args.transport} calls, {args.seconds:g} s each way, "
        f"policy=model, {os.cpu_count()} cores",
        file=sys.stderr,
    )
    runs = [await measure(grid, args) for grid in (True, False)]
    print(
        "| micro-turn clock | calls joined | forwards | calls per forward, mean | median | "
        "forwards serving every call | micro-turn step p50 / p95 ms (bucket bounds) |\n"
        "|---|---|---|---|---|---|---|"
    )
    for run in runs:
        print(run.row())
    grid, own = (r.batch.total / r.batch.count if r.batch.count else float("nan") for r in runs)
    print(f"calls per forward, one grid / own phase: {grid / own:.1f}x")
    return 0 if all(r.joined == r.calls and r.batch.count for r in runs) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="presence bench batching", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--calls", type=int, default=20, help="concurrent calls [20]")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured time per clock mode [30]")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--transport",
        choices=("twilio", "webrtc"),
        default="twilio",
        help="how the callers call: Twilio media websockets (light) or aiortc peers [twilio]",
    )
    args = parser.parse_args(argv)
    if args.calls < 1 or args.seconds <= 0:
        parser.error("--calls must be at least 1 and --seconds positive")
    return aio.run(run_all(args))
