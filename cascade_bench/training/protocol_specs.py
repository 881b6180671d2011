"""The staged training protocols as recipes, without torch: ``Protocol`` (layers, learning rates,
patience, hard ratio and the kind of stage per protocol) and the seeds' ``PROTOCOLS``. The run
config checks and the command line read them; ``protocols`` trains by them."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from .loops import TrainConfig

#: The kinds of stage a protocol grows (``protocols.STAGE_KINDS`` maps them to their classes).
STAGE_KIND_NAMES = ("block", "llm")


@dataclass(frozen=True)
class Protocol:
    """A staged training recipe: per stage layers, learning rate and patience; one hard ratio; the
    kind of stage it grows (``"block"``: one model extended block by block; ``"llm"``: separate
    whole models). ``max_epochs`` is a safety cap: a stage that reaches it is reported as cut."""

    name: str
    layers: tuple[int, ...]
    lrs: tuple[float, ...]
    patience: tuple[int, ...]
    hard_ratio: "float | tuple[float, ...]" = 0.5
    exit_rule: str = "max_prob"
    max_epochs: int = 10
    leaky_seed_protocol: bool = False
    stage_kind: str = "block"
    training: str = "staged"
    layer_weights: tuple[float, ...] = ()
    exit_head: str = "copy"
    lr_decay: Optional[float] = None
    hard_examples: str = "tokens"

    def __post_init__(self):
        n = len(self.layers)
        if n < 1 or len(self.lrs) != n or len(self.patience) != n:
            raise ValueError(
                f"protocol {self.name!r}: layers, lrs and patience need one entry per stage, got "
                f"{len(self.layers)}, {len(self.lrs)}, {len(self.patience)}"
            )
        ratios = self.hard_ratio if isinstance(self.hard_ratio, tuple) else (self.hard_ratio,) * (n - 1)
        if len(ratios) != n - 1 or any(
            isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r < 1.0 for r in ratios
        ):
            raise ValueError(
                f"protocol {self.name!r}: hard_ratio must be one number in (0, 1), or one per stage "
                f"boundary ({n - 1} for {n} stages), got {self.hard_ratio!r}"
            )
        if self.exit_head not in EXIT_HEADS:
            raise ValueError(
                f"protocol {self.name!r}: exit_head must be one of {list(EXIT_HEADS)}, got {self.exit_head!r}"
            )
        if self.exit_head == "frozen" and (self.stage_kind != "block" or self.training != "staged"):
            raise ValueError(
                f"protocol {self.name!r}: exit_head 'frozen' applies to block stages trained one "
                f"by one (a later block exits through a frozen copy of the trained head); got "
                f"stage_kind {self.stage_kind!r}, training {self.training!r}"
            )
        if self.hard_examples not in HARD_EXAMPLES:
            raise ValueError(
                f"protocol {self.name!r}: hard_examples must be one of {list(HARD_EXAMPLES)}, got "
                f"{self.hard_examples!r}"
            )
        if self.hard_examples != "tokens" and self.training != "staged":
            raise ValueError(
                f"protocol {self.name!r}: hard_examples {self.hard_examples!r} applies to staged "
                f"training (joint training trains every stage on every token)"
            )
        if self.lr_decay is not None:
            if (
                isinstance(self.lr_decay, bool)
                or not isinstance(self.lr_decay, (int, float))
                or not 0.0 < self.lr_decay <= 1.0
            ):
                raise ValueError(f"protocol {self.name!r}: lr_decay must be in (0, 1] or None, got {self.lr_decay!r}")
            expected = decayed_lrs(self.lrs[0], self.lr_decay, n)
            if any(not math.isclose(a, b, rel_tol=1e-9) for a, b in zip(self.lrs, expected)):
                raise ValueError(
                    f"protocol {self.name!r}: lr_decay {self.lr_decay} gives lrs {expected} from "
                    f"stage 0's {self.lrs[0]}, got {self.lrs} (build them with decayed_lrs)"
                )
        if self.stage_kind not in STAGE_KIND_NAMES:
            raise ValueError(
                f"protocol {self.name!r}: stage_kind must be one of {list(STAGE_KIND_NAMES)}, got {self.stage_kind!r}"
            )
        if self.training not in ("staged", "joint"):
            raise ValueError(f"protocol {self.name!r}: training must be 'staged' or 'joint', got {self.training!r}")
        if self.training == "joint":
            if (
                self.stage_kind != "block"
                or len(self.layer_weights) != n
                or len(set(self.lrs)) != 1
                or len(set(self.patience)) != 1
            ):
                raise ValueError(
                    f"protocol {self.name!r}: joint training needs block stages, one layer weight per "
                    f"stage and one lr and patience for all (got stage_kind {self.stage_kind!r}, "
                    f"layer_weights {self.layer_weights}, lrs {self.lrs}, patience {self.patience})"
                )
        elif self.layer_weights:
            raise ValueError(f"protocol {self.name!r}: layer_weights apply to joint training only")

    @property
    def boundary_hard_ratios(self) -> tuple[float, ...]:
        """The hard ratio at each stage boundary (stage k's threshold leaves this share of the tokens
        reaching it to continue): one per non-last stage. A falling sequence is LASH's staged thresholds."""
        n = len(self.layers)
        return tuple(self.hard_ratio) if isinstance(self.hard_ratio, tuple) else (self.hard_ratio,) * (n - 1)

    @property
    def grows(self) -> str:
        """In words: what the protocol builds (for reports)."""
        if self.training == "joint":
            return (
                f"one model of {sum(self.layers)} layers in blocks of {'/'.join(map(str, self.layers))}, "
                f"every block trained at once on every token (exit loss weights {self.layer_weights}), each "
                f"non-last block exiting through its own head"
            )
        if self.stage_kind == "block":
            head = (
                "a frozen copy of the trained exit head (only the new layers train: the ASHEM stage spec)"
                if self.exit_head == "frozen"
                else "a trainable copy of the trained exit head"
            )
            return (
                f"one model grown block by block (extend: new layers on the residual stream, {head}, embedding "
                f"and lower blocks frozen)"
            )
        decay = f"; lr x{self.lr_decay:g} per later model" if self.lr_decay is not None else ""
        return f"separate whole models (stage k+1 reads stage k's final hidden states; its own norm and head{decay})"

    def with_stages(self, layers: Sequence[int]) -> "Protocol":
        """The protocol with ``layers`` per stage: stages beyond its own follow its last stage's recipe
        (lr, patience, hard ratio; under ``lr_decay`` the lr keeps decaying), extra stages are dropped."""
        layers = tuple(layers)
        n, own = len(layers), len(self.layers)
        if n < 1:
            raise ValueError(f"protocol {self.name!r}: layers needs at least one stage, got {layers!r}")

        def grow(values: tuple) -> tuple:
            return tuple(values[:n]) + (values[-1],) * max(0, n - own)

        ratios = self.boundary_hard_ratios
        hard = (
            self.hard_ratio
            if not isinstance(self.hard_ratio, tuple)
            else tuple(ratios[: n - 1]) + (ratios[-1],) * max(0, n - 1 - len(ratios))
        )
        lrs = decayed_lrs(self.lrs[0], self.lr_decay, n) if self.lr_decay is not None else grow(self.lrs)
        weights = grow(self.layer_weights) if self.layer_weights else ()
        return replace(
            self, layers=layers, lrs=lrs, patience=grow(self.patience), hard_ratio=hard, layer_weights=weights
        )

    def prefix(self, n: int) -> "Protocol":
        """The protocol's first ``n`` stages (same recipes): ``train_ensemble`` on ``prefix(1)`` trains stage
        0 alone, and ``trained_stages=1`` with the whole protocol continues from it."""
        if not 1 <= n <= len(self.layers):
            raise ValueError(
                f"protocol {self.name!r} has {len(self.layers)} stages; prefix needs 1..{len(self.layers)}, got {n}"
            )
        hard = self.hard_ratio[: n - 1] if isinstance(self.hard_ratio, tuple) else self.hard_ratio
        return replace(
            self,
            layers=self.layers[:n],
            lrs=self.lrs[:n],
            patience=self.patience[:n],
            layer_weights=self.layer_weights[:n],
            hard_ratio=hard,
        )

    def stage_config(self, k: int, seed: int, max_steps_per_epoch: Optional[int] = None) -> "TrainConfig":
        from .loops import TrainConfig

        return TrainConfig(
            lr=self.lrs[k],
            patience=self.patience[k],
            max_epochs=self.max_epochs,
            seed=seed + k,
            max_steps_per_epoch=max_steps_per_epoch,
        )


#: What stage k trains on: the tokens that continue past stage k-1 (token level, our default), or the
#: whole sequences whose mean stage-(k-1) confidence is below the threshold (sequence level: the ASHEM
#: seed's hard examples, 256 sequences of 128 tokens in its run).
HARD_EXAMPLES = ("tokens", "sequences")

#: How a later block exits (block protocols): through a trainable copy of the trained exit head (our
#: default), or through a frozen copy, so only its new layers train (the ASHEM stage spec: embedding,
#: lower layers and output head frozen).
EXIT_HEADS = ("copy", "frozen")


def decayed_lrs(first: float, decay: float, stages: int) -> tuple[float, ...]:
    """CASCADE's learning rates: stage k trains at ``first * decay**k``."""
    return tuple(first * decay**k for k in range(stages))


#: The seeds' recipes. ASHEM: a 2-layer model on all data (lr 1e-3, patience 1), then grown by 2 layers
#: trained on the hard half (lr 1e-4, patience 3). LEGO-3: the same grown once more. CASCADE: the
#: CASCADE spec: a separate 2-layer model as stage 1, lr halved per later model (lr_decay 0.5), its
#: hard tokens chosen by cos_sim.
PROTOCOLS: dict[str, Protocol] = {
    "ashem": Protocol("ashem", layers=(2, 2), lrs=(1e-3, 1e-4), patience=(1, 3), hard_ratio=0.5),
    "lego-3": Protocol("lego-3", layers=(2, 2, 2), lrs=(1e-3, 1e-4, 1e-4), patience=(1, 3, 3), hard_ratio=0.5),
    "cascade": Protocol(
        "cascade",
        layers=(2, 2),
        lrs=decayed_lrs(1e-3, 0.5, 2),
        patience=(1, 3),
        hard_ratio=0.5,
        stage_kind="llm",
        exit_rule="cos_sim",
        lr_decay=0.5,
    ),
    # Deep supervision (LASH-style weights): one 4-layer model, both exits trained together from scratch.
    "deep": Protocol(
        "deep",
        layers=(2, 2),
        lrs=(1e-3, 1e-3),
        patience=(1, 1),
        hard_ratio=0.5,
        training="joint",
        layer_weights=(1.0, 1.0),
    ),
}
