"""Routing's named choices, without torch (the command line and the run config's checks read them):
the K/V policies for exited tokens (``cached_pass``) and the risks risk control bounds
(``risk_control``)."""

from __future__ import annotations

KV_POLICIES = ("absent", "propagate", "recompute")
RISKS = ("disagreement", "nll_increase")
