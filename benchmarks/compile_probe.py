"""Does torch.compile take the routing overhead away? Full and routed passes (50% forced exit after
stage 0, embedded bytes), eager and then with every decoder layer compiled in place
(``nn.Module.compile(dynamic=True)``), each routed pass timed back to back with a full pass.

    python benchmarks/compile_probe.py                                    # the default run's stage size
    python benchmarks/compile_probe.py --preset gpt2-cpu --layers 4 4 --seq-len 512 --pairs 5

Prints, per mode: the first pass pair's seconds (compilation included when compiled), the full
pass's median milliseconds, and the median of routed/full over the pairs. Not part of the toolkit:
counted FLOPs (FlopCounterMode) do not see inside compiled graphs, so no measured record comes from
compiled stages.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from cascade_bench.data.corpus import embedded_byte_windows
from cascade_bench.measure.allocator import retain_freed_memory
from cascade_bench.routing.passes import forward_cascade
from cascade_bench.stages.presets import build_ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-mini")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    retain_freed_memory()
    torch.set_num_threads(args.threads)
    cascade = build_ensemble(args.preset, args.layers, seed=0).eval()
    ids = embedded_byte_windows(args.batch_size, args.seq_len)
    never = [math.inf] * len(cascade)

    def run(thresholds, method="routed"):
        with torch.inference_mode():
            return forward_cascade(cascade, ids, None, ids, thresholds=thresholds, method=method)

    confidence = run(never).stage_confidence[0].flatten()
    half = [float(confidence.quantile(0.5)), *never[1:]]

    def measure(mode: str) -> None:
        start = time.perf_counter()
        run(never, "full"), run(half)
        first = time.perf_counter() - start
        fulls, ratios = [], []
        for _ in range(args.pairs):
            a = time.perf_counter()
            run(never, "full")
            b = time.perf_counter()
            run(half)
            c = time.perf_counter()
            fulls.append(b - a)
            ratios.append((c - b) / (b - a))
        print(
            f"{mode}: first pair {first:.2f} s, full pass {statistics.median(fulls) * 1e3:.1f} ms, "
            f"routed/full {statistics.median(ratios):.3f} (median of {args.pairs} pairs)",
            flush=True,
        )

    print(
        f"{args.preset} {args.layers}, {args.batch_size} x {args.seq_len}, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    measure("eager")
    for stage in cascade:
        for layer in stage.layers:
            layer.compile(dynamic=True)
    measure("compiled")
    measure("compiled, warm")


if __name__ == "__main__":
    main()
