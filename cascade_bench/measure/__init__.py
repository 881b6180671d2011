"""Measurement primitives the routing is measured with (imports only ``stages``).

- ``probes``: named spans inside a forward pass, for timers and counters to hook into
- ``flops``: counted FLOPs (``torch.utils.flop_counter``), whole pass or per span
- ``analytic``: the analytic FLOP model, equal to the counted FLOPs by construction
- ``timing``: wall clock and CUDA-event timers, span timers, interleaved ratios
- ``memory``: peak memory of a pass
- ``environment``: the conditions a result was obtained under
"""

from .analytic import expected_cost, routed_cost, stage_cost
from .environment import environment_conditions
from .flops import FlopBreakdown, count_flops, count_pass_flops
from .memory import PeakTensorBytes, peak_memory_bytes
from .probes import NO_PROBE, Probe
from .timing import SpanTimer, TimingStats, time_call, time_spans

__all__ = [
    "NO_PROBE",
    "FlopBreakdown",
    "PeakTensorBytes",
    "Probe",
    "SpanTimer",
    "TimingStats",
    "count_flops",
    "count_pass_flops",
    "environment_conditions",
    "expected_cost",
    "peak_memory_bytes",
    "routed_cost",
    "stage_cost",
    "time_call",
    "time_spans",
]
