"""Routing: tokens through the stages, exited tokens physically skipping the rest.

- ``compaction``: gather and scatter, the tokens that reach a stage as dense batches
- ``exit_head``: logits in chunks, reduced at once to NLL, argmax and confidence
- ``passes``: the routed pass and its baselines (masked, full)
- ``calibration``: thresholds for a target fraction of continuing tokens
- ``risk_control``: thresholds with a Learn-then-Test guarantee on disagreement or NLL increase
- ``evaluation``: PPL, accuracy, hard/easy PPL and exit ratios over a dataloader
- ``oracle``: the oracle bound (best exit per token, by hindsight)
- ``generation``: early-exit decoding with one KV cache per stage
"""

from cascade_bench import lazy_exports

# public names load from their modules on first use (PEP 562): importing the package imports no torch
__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".calibration": ("calibrate_thresholds", "threshold_for_hard_ratio"),
        ".evaluation": ("EvalResult", "evaluate"),
        ".generation": ("GenerationOutput", "generate"),
        ".oracle": ("OracleResult", "oracle_bound"),
        ".passes": ("RoutedOutput", "forward_cascade"),
        ".risk_control": ("RiskControlResult", "risk_controlled_thresholds"),
    },
)
