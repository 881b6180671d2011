"""Named spans inside a forward pass, for timers and FLOP counters to hook into.

The router marks its phases with ``probe.span(name)``: per stage k, ``stage{k}`` containing
``stage{k}.gather`` (laying out the tokens that reached the stage), ``stage{k}.layers`` (the
stage's model), ``stage{k}.exit`` (the exit decision, containing ``stage{k}.exit_head``: lm_head
and NLL, and ``stage{k}.exit_rule``: the confidence) and ``stage{k}.scatter`` (per-token results
back to original positions, continuing tokens split off). A span name may occur several times
in one pass (chunks, buckets); users of the spans add the occurrences up.

By default the probe is :data:`NO_PROBE`, whose spans do nothing: timing a pass costs no
counting. Timers (``timing.SpanTimer``) and counters (``flops.FlopProbe``) are probes too.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext


class Probe:
    """Base probe: every span is a no-op."""

    _nothing = nullcontext()

    def span(self, name: str) -> AbstractContextManager:
        return self._nothing


NO_PROBE = Probe()
