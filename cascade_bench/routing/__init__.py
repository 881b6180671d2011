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

from .calibration import calibrate_thresholds, threshold_for_hard_ratio
from .evaluation import EvalResult, evaluate
from .generation import GenerationOutput, generate
from .oracle import OracleResult, oracle_bound
from .passes import RoutedOutput, forward_cascade, full_forward, masked_forward, routed_forward
from .risk_control import RiskControlResult, risk_controlled_thresholds

__all__ = [
    "EvalResult",
    "GenerationOutput",
    "OracleResult",
    "RiskControlResult",
    "RoutedOutput",
    "calibrate_thresholds",
    "evaluate",
    "forward_cascade",
    "full_forward",
    "generate",
    "masked_forward",
    "oracle_bound",
    "risk_controlled_thresholds",
    "routed_forward",
    "threshold_for_hard_ratio",
]
