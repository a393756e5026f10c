"""Step time of the interaction model per micro-turn, CPU and (when there is one) GPU.

CPU: the trained default model (presence/model/checkpoint) stepping 1, 10, 20 and 50 calls at
once through ``InteractionStreamer.step`` (input checks, encoding, one batched forward, decoding
into Actions); p50/p95 per step, and whether 20 calls fit in one 200 ms micro-turn. Then a
~1B-parameter configuration with random weights at a small batch (it runs, it is slow).

GPU (``--gpu``, needs CUDA): the default configuration and the ~1B one in bfloat16 with CUDA
graphs per batch bucket, batch 1..1024 (as far as memory allows): p50/p99 step latency, the
largest batch with p99 < 100 ms, memory per call, and a roofline comparison: every step reads
all weights once (plus each call's KV window), so weights_bytes / HBM bandwidth is a floor.

    python bench/model_bench.py                 # CPU, writes bench/results/model_cpu.txt
    python bench/model_bench.py --gpu --out bench/results/model_gpu.txt
    python bench/model_bench.py --no-1b --call-hours 2   # also one two-hour call, step by step
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from presence.model import CHECKPOINT_DIR, PresenceInteractionModel
from presence.model.inputs import encode_turn, stack_turns
from presence.model.streaming import InteractionStreamer
from presence.model.train import make_config
from presence.seams import FloorState, MicroTurn, VideoFrame

HBM_BYTES_PER_S = 3.0e12  # ~3 TB/s (H100 SXM 3.35, H200 4.8): the floor is computed with 3.0
TICK_MS = 200.0


def turn(i: int, call: int) -> MicroTurn:
    rng = np.random.default_rng(call * 7919 + i)
    video: tuple[VideoFrame, ...] = ()
    if (i + call) % 5 in (0, 2):  # ~2 fps of video over 200 ms micro-turns
        video = (VideoFrame(i * 0.2, "caller", rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)),)
    return MicroTurn(
        call_id=f"c{call}",
        index=i,
        start=i * 0.2,
        duration=0.2,
        caller_audio=(rng.standard_normal(3200) * 0.05).astype(np.float32),
        bot_audio=(rng.standard_normal(3200) * 0.02).astype(np.float32),
        lost=np.zeros(10, bool),
        vad=rng.random(10).astype(np.float32),
        video=video,
    )


def percentiles(times: list[float]) -> tuple[float, float, float]:
    ms = np.array(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), float(np.percentile(ms, 99))


def timed(fn: Callable[[], object], steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def weight_bytes(model: PresenceInteractionModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_read_bytes(streamer: InteractionStreamer) -> int:
    """Bytes of one call's KV window read by one step (all layers, keys and values)."""
    c = streamer.cache
    return (c.k[:, 0].numel() + c.v[:, 0].numel()) * c.k.element_size()


# ---------------------------------------------------------------------- CPU
def cpu_default(print_: Callable[[str], None], calls: list[int], steps: int) -> None:
    model = PresenceInteractionModel.from_pretrained(str(CHECKPOINT_DIR), local_files_only=True).eval()
    c = model.config
    print_(
        f"default model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
        f"{c.tokens_per_turn} tokens/micro-turn, window {c.window_turns} micro-turns, float32, "
        f"{torch.get_num_threads()} threads"
    )
    streamer = InteractionStreamer(model, max_slots=max(calls))
    slots = [streamer.allocate(f"c{i}") for i in range(max(calls))]
    print_(f"cache per call {streamer.bytes_per_slot / 1e6:.2f} MB (constant over the call)")
    state = FloorState()
    fits = None
    for n in calls:

        def step(n: int = n, k: list[int] = [0]) -> None:  # noqa: B006 - a step counter
            k[0] += 1
            streamer.step([(slots[j], turn(k[0], j), state) for j in range(n)])

        full = timed(step, steps, warmup=3)
        arrays = stack_turns([encode_turn(turn(99, j), state, c) for j in range(n)])
        model_only = timed(
            lambda n=n, arrays=arrays: streamer.forward_arrays(slots[:n], arrays), steps, warmup=1
        )
        p50, p95, _ = percentiles(full)
        m50, m95, _ = percentiles(model_only)
        print_(
            f"  {n:>3} calls: step p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  ({p50 / n:5.2f} ms per call)   "
            f"forward only p50 {m50:7.1f} ms  p95 {m95:7.1f} ms"
        )
        if n == 20:
            fits = p95 < TICK_MS
    if fits is not None:
        print_(f"  20 calls within a {TICK_MS:.0f} ms micro-turn at p95: {'yes' if fits else 'NO'}")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def long_call(print_: Callable[[str], None], hours: float) -> None:
    """One call of ``hours`` through the default model, step by step: the cache keeps its storage,
    the process does not grow, the step time stays flat (tests/test_model.py runs a shortcut)."""
    model = PresenceInteractionModel.from_pretrained(str(CHECKPOINT_DIR), local_files_only=True).eval()
    streamer = InteractionStreamer(model, max_slots=1)
    slot = streamer.allocate("long")
    layout = [(t.data_ptr(), tuple(t.shape)) for t in streamer.cache.tensors()]
    state = FloorState()
    steps = int(hours * 3600 / (TICK_MS / 1000))
    window = min(3000, steps // 4)  # 10 minutes of micro-turns at each end
    times: list[float] = []
    rss0 = rss_bytes()
    started = time.perf_counter()
    for i in range(steps):
        t = time.perf_counter()
        out = streamer.step([(slot, turn(i, 0), state)])[0]
        times.append(time.perf_counter() - t)
        if i == window:
            rss0 = rss_bytes()
        if i and i % 6000 == 0:
            print_(f"  {i * TICK_MS / 60_000:5.0f} min: rss {rss_bytes() / 2**20:.1f} MiB")
    same = layout == [(t.data_ptr(), tuple(t.shape)) for t in streamer.cache.tensors()]
    first, last = percentiles(times[:window]), percentiles(times[-window:])
    print_(
        f"{hours:g} h = {steps} micro-turns in {time.perf_counter() - started:.0f} s; turns seen "
        f"{streamer.turns_seen(slot)}; cache {streamer.cache.nbytes} bytes, same storage: {same}; "
        f"outputs finite: {all(np.isfinite(v) for v in out.probs.values())}"
    )
    print_(
        f"  step p50/p95 first {window} {first[0]:.2f}/{first[1]:.2f} ms, last {window} "
        f"{last[0]:.2f}/{last[1]:.2f} ms; rss growth after the first {window}: "
        f"{(rss_bytes() - rss0) / 2**20:+.1f} MiB"
    )


def cpu_1b(print_: Callable[[str], None], batches: list[int], steps: int) -> None:
    torch.manual_seed(0)
    config = make_config("1b")
    started = time.perf_counter()
    model = PresenceInteractionModel(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print_(
        f"1B config (random weights): {n_params / 1e9:.2f} B params, float32 {weight_bytes(model) / 1e9:.1f} GB, "
        f"hidden {config.hidden_size} x {config.num_hidden_layers} layers, {config.tokens_per_turn} tokens/micro-turn "
        f"(built in {time.perf_counter() - started:.0f} s)"
    )
    streamer = InteractionStreamer(model, max_slots=max(batches))
    slots = [streamer.allocate() for _ in range(max(batches))]
    print_(f"  cache per call {streamer.bytes_per_slot / 1e6:.1f} MB (float32)")
    state = FloorState()
    for n in batches:
        arrays = stack_turns([encode_turn(turn(1, j), state, config) for j in range(n)])
        times = timed(lambda n=n, arrays=arrays: streamer.forward_arrays(slots[:n], arrays), steps, warmup=1)
        p50, p95, _ = percentiles(times)
        print_(
            f"  {n:>3} calls: step p50 {p50:8.0f} ms  p95 {p95:8.0f} ms  "
            f"({'fits' if p95 < TICK_MS else 'does not fit'} a {TICK_MS:.0f} ms micro-turn on this CPU)"
        )


# ---------------------------------------------------------------------- GPU
def gpu_config(print_: Callable[[str], None], name: str, model: PresenceInteractionModel, steps: int) -> None:
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    props = torch.cuda.get_device_properties(dev)
    model = model.to(dev, dtype).eval()
    wbytes = weight_bytes(model)
    probe = InteractionStreamer(model, max_slots=1, device=dev)
    per_call = probe.bytes_per_slot
    kv = kv_read_bytes(probe)
    del probe
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info()
    budget = int(free * 0.70)  # leave room for graph workspaces
    max_slots = max(1, min(1024, budget // per_call - 1))
    print_(
        f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, bf16 weights "
        f"{wbytes / 1e9:.3f} GB, {model.config.tokens_per_turn} tokens/micro-turn, window "
        f"{model.config.window_turns}; memory per call {per_call / 1e6:.2f} MB (KV ring + memory); "
        f"{props.name}; slots that fit: {max_slots}"
    )
    streamer = InteractionStreamer(model, max_slots=max_slots, device=dev, cuda_graphs=True)
    slots = [streamer.allocate() for _ in range(max_slots)]
    state = FloorState()
    best = None
    size = 1
    sizes = []
    while size <= min(1024, max_slots):
        sizes.append(size)
        size *= 2
    if max_slots < 1024 and max_slots not in sizes:
        sizes.append(max_slots)
    base = [encode_turn(turn(3, j), state, model.config) for j in range(64)]
    t_enc = timed(lambda: encode_turn(turn(5, 1), state, model.config), 200, warmup=10)
    print_(f"  host encode per call (validation, video resize): p50 {np.median(t_enc) * 1e3:.3f} ms")
    print_("  batch   p50 ms   p99 ms   per-call us   roofline ms (weights / +KV)   achieved GB/s")
    for n in sizes:
        arrays = stack_turns([base[j % len(base)] for j in range(n)])
        try:
            times = timed(
                lambda n=n, arrays=arrays: streamer.forward_arrays(slots[:n], arrays), steps, warmup=3
            )
        except torch.cuda.OutOfMemoryError:
            print_(f"  {n:>5}  out of memory")
            break
        p50, _, p99 = percentiles(times)
        roof_w = wbytes / HBM_BYTES_PER_S * 1e3
        roof_all = (wbytes + n * kv) / HBM_BYTES_PER_S * 1e3
        gbs = (wbytes + n * kv) / (p50 / 1e3) / 1e9
        print_(
            f"  {n:>5}  {p50:7.2f}  {p99:7.2f}   {p50 * 1e3 / n:10.1f}    {roof_w:6.3f} / {roof_all:7.3f}"
            f"              {gbs:8.0f}"
        )
        if p99 < 100.0:
            best = n
    print_(f"  largest batch with p99 < 100 ms: {best}")
    streamer.cache = model.new_cache(1, dev)  # hand the big cache back before the next config
    torch.cuda.empty_cache()


def gpu_check(print_: Callable[[str], None]) -> None:
    """CUDA graphs vs the eager CPU path on the trained checkpoint (float32, loaded offline
    with this machine's transformers): same outputs, step by step, with batches of changing
    size and slot order (padding rows go to the scratch slot)."""
    import transformers

    cpu_model = PresenceInteractionModel.from_pretrained(str(CHECKPOINT_DIR), local_files_only=True).eval()
    gpu_model = PresenceInteractionModel.from_pretrained(str(CHECKPOINT_DIR), local_files_only=True).eval()
    eager = InteractionStreamer(cpu_model, max_slots=4)
    graphs = InteractionStreamer(gpu_model, max_slots=4, device="cuda", cuda_graphs=True)
    a = [eager.allocate() for _ in range(3)]
    b = [graphs.allocate() for _ in range(3)]
    worst = 0.0
    state = FloorState(bot_speaking=True)
    for i in range(14):
        order = [2, 0, 1] if i % 3 else [1]
        batch_a = [(a[j], turn(i, j), state) for j in order]
        batch_b = [(b[j], turn(i, j), state) for j in order]
        for x, y in zip(eager.step(batch_a), graphs.step(batch_b), strict=True):
            worst = max(worst, max(abs(x.probs[k] - y.probs[k]) for k in x.probs))
            worst = max(worst, float(np.abs(x.vap - y.vap).max()), abs(x.alert - y.alert))
    print_(
        f"checkpoint loaded with transformers {transformers.__version__}; CUDA graphs vs eager CPU "
        f"(float32, 14 steps, batches 1 and 3): max |diff| {worst:.2e}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark (needs CUDA)")
    parser.add_argument("--out", default=None, help="results file (default bench/results/model_cpu.txt)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-1b", action="store_true", help="skip the ~1B configuration")
    parser.add_argument(
        "--call-hours", type=float, default=0.0, help="also step one call this long (CPU; 2 h: ~36,000 steps)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def print_(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    print_(
        f"# model_bench {time.strftime('%Y-%m-%d %H:%M')}  python {platform.python_version()}  torch "
        f"{torch.__version__}  cpu cores {os.cpu_count()}"
    )
    if args.gpu:
        if not torch.cuda.is_available():
            print(
                "--gpu needs a CUDA device and none is visible; the CPU figures: without --gpu",
                file=sys.stderr,
            )
            return 2
        out = Path(args.out or "bench/results/model_gpu.txt")
        gpu_check(print_)
        torch.manual_seed(0)
        # The committed checkpoint's architecture ("small"); weights do not change the timing.
        gpu_config(
            print_, "default config (small)", PresenceInteractionModel(make_config("small")), args.steps
        )
        if not args.no_1b:
            with torch.device("cuda"):
                big = PresenceInteractionModel(make_config("1b"))
            gpu_config(print_, "~1B config (random weights)", big, args.steps)
    else:
        out = Path(args.out or "bench/results/model_cpu.txt")
        print_("## CPU, default model, InteractionStreamer.step (encode + batched forward + decode)")
        cpu_default(print_, [1, 10, 20, 50], args.steps)
        if not args.no_1b:
            print_("## CPU, ~1B configuration, forward only, small batch")
            cpu_1b(print_, [1, 2], max(2, args.steps // 10))
        if args.call_hours > 0:
            print_(f"## CPU, default model, one call of {args.call_hours:g} h, one step per micro-turn")
            long_call(print_, args.call_hours)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
