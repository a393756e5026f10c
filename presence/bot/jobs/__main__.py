"""``python -m presence.bot.jobs --kinds noop,sleep ...``: one worker process.

For tests, benchmarks and operators who want a worker without the full ``presence`` CLI. Prints
``ready <consumer>`` on stdout once its consumer groups exist.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from presence.bot.jobs.kinds import load_handlers, resolve_docs_dir
from presence.bot.jobs.redisio import DEFAULT_REDIS_URL
from presence.bot.jobs.worker import Worker, default_consumer_name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m presence.bot.jobs", description=__doc__)
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--prefix", default="presence", help="key prefix (tests use a unique one)")
    p.add_argument("--kinds", required=True, help="comma separated, e.g. search,code,think")
    p.add_argument("--consumer", default="", help="consumer name (default host-pid)")
    p.add_argument("--idle-reclaim-ms", type=int, default=30_000)
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--docs-dir", default="", help="folder the search kind indexes (default: bundled docs/)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    options: dict[str, str] = {}
    if args.docs_dir or "search" in kinds:
        docs_dir = resolve_docs_dir(args.docs_dir)  # empty: the bundled docs/ folder
        if docs_dir:
            options["docs_dir"] = docs_dir
    worker = Worker(
        args.redis_url,
        kinds,
        load_handlers(kinds),
        args.consumer or default_consumer_name(),
        idle_reclaim_ms=args.idle_reclaim_ms,
        max_attempts=args.max_attempts,
        prefix=args.prefix,
        options=options,
        concurrency=args.concurrency,
    )

    async def announce() -> None:
        await worker.started.wait()
        print(f"ready {worker.name}", flush=True)

    ready = asyncio.create_task(announce())
    try:
        await worker.run(install_signals=True)
    finally:
        ready.cancel()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
