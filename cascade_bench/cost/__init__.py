"""Cost of a routed pass, on top of routing: FLOPs, time, memory and quality in one record.

- ``measurement``: ``measure_cost`` and its ``CostRecord``
- ``fvcore_check``: fvcore as a third witness of the counted FLOPs
- ``table``: text tables of a ``CostRecord``
"""

from .measurement import CostRecord, measure_cost
from .table import format_cost

__all__ = ["CostRecord", "format_cost", "measure_cost"]
