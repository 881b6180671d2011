"""What one stage call costs beyond its layers: a later stage of the default run's size (gpt2-mini,
2 layers, hidden 128) called as the cascade calls it (``LLM.forward`` on hidden states, through
the Hugging Face model: masks, positions, output objects) against the same decoder layers and
final norm called directly, its exit head, and the same size of stage built as a block of one
model (``Block.forward``: the layers called without the model wrapper, as the default run's stages
are), at decode shapes (rows x 1 token) and prefill shapes.

    python benchmarks/stage_call_probe.py

Medians of 200 calls after 10 warm-up calls, milliseconds. The direct call passes no attention
mask (a timing probe: the numbers it computes are not the stage's); everything else is the same
modules on the same inputs.
"""

from __future__ import annotations

import statistics
import time

import torch

from cascade_bench.measure.allocator import retain_freed_memory
from cascade_bench.stages.presets import build_blocks, build_ensemble

SHAPES = ((1, 1), (4, 1), (8, 1), (4, 64), (8, 128))


def median_ms(call, calls: int = 200) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    retain_freed_memory()
    torch.set_num_threads(2)
    stage = build_ensemble("gpt2-mini", [2, 2], seed=0).eval()[1]
    # the same layers as the default run's stages are: a block of one model (its layers called directly)
    block = build_blocks("gpt2-mini", [2, 2], seed=0).eval()[1]
    print(f"gpt2-mini stage of {stage.num_layers} layers, hidden {stage.hidden_size}, torch {torch.__version__}")
    print(
        "| rows x tokens | stage call (ms) | layers + norm called directly (ms) | the rest of the call (ms) "
        "| exit head (ms) | block call (ms) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for rows, length in SHAPES:
            states = torch.randn(rows, length, stage.hidden_size)

            def direct():
                hidden = states
                for layer in stage.layers:
                    out = layer(hidden)
                    hidden = out[0] if isinstance(out, tuple) else out
                return stage.parts.final_norm(hidden)

            whole = median_ms(lambda: stage(inputs_embeds=states))
            layers = median_ms(direct)
            head = median_ms(lambda: stage.logits(states.reshape(-1, stage.hidden_size)))
            sliced = median_ms(lambda: block(inputs_embeds=states))
            print(
                f"| {rows} x {length} | {whole:.3f} | {layers:.3f} | {whole - layers:.3f} | {head:.3f} | {sliced:.3f} |"
            )


if __name__ == "__main__":
    main()
