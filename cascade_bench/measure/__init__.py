"""Measurement primitives the routing is measured with (imports only ``stages``).

- ``probes``: named spans inside a forward pass, for timers and counters to hook into
- ``flops``: counted FLOPs (``torch.utils.flop_counter``), whole pass or per span
- ``analytic``: the analytic FLOP model, equal to the counted FLOPs by construction
- ``timing``: wall clock and CUDA-event timers, span timers, interleaved ratios
- ``memory``: peak memory of a pass
- ``environment``: the conditions a result was obtained under
"""

from cascade_bench import lazy_exports

# public names load from their modules on first use (PEP 562): importing the package imports no torch
__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".analytic": ("expected_cost", "routed_cost", "stage_cost"),
        ".environment": ("environment_conditions",),
        ".flops": ("FlopBreakdown", "count_flops", "count_pass_flops"),
        ".memory": ("PeakTensorBytes", "peak_memory_bytes"),
        ".probes": ("NO_PROBE", "Probe"),
        ".timing": ("SpanTimer", "TimingStats", "time_call", "time_spans"),
    },
)
