"""Cost of a routed pass, on top of routing: FLOPs, time, memory and quality in one record.

- ``measurement``: ``measure_cost`` and its ``CostRecord``
- ``fvcore_check``: fvcore as a third witness of the counted FLOPs
- ``table``: text tables of a ``CostRecord``
"""

from cascade_bench import lazy_exports

# public names load from their modules on first use (PEP 562): importing the package imports no torch
__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".measurement": ("CostRecord", "measure_cost"),
        ".table": ("format_cost",),
    },
)
