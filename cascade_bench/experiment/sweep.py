"""What every point of one run is measured with, and the loop that measures the points a results
store still lacks.

A ``Sweep`` holds the trained (or loaded) cascade, the scored and calibration batches and the
measurement settings, and gives the points what they share, each built once: thresholds per
(exit rule, hard ratio), calibrated for every swept ratio at once; the other exit rules
(``rule_sweep.build_rule``); the dense baseline. ``measure`` runs one point with its exit rule in
place and adds the ratio of its wall time to the full cascade's, timed back to back on the same
batches; ``run`` measures and stores every point not stored yet (a rerun resumes).
"""

from __future__ import annotations

import statistics
from typing import Callable, Optional, Sequence

import torch

from ..cost.measurement import CostRecord, measure_cost
from ..measure.distributed import Ranks, all_ranks, from_main, shard, sharded
from ..measure.intervals import IntervalSettings, median_interval, paired_difference, quality_intervals
from ..measure.timing import PhaseClock, back_to_back_times
from ..routing.calibration import calibrate_sweep
from ..routing.passes import forward_cascade
from ..routing.stage_reuse import RuleReuse, StageReuse
from ..stages.ensemble import Ensemble, evaluation_mode
from .config import ExperimentConfig
from .point_measures import METHODS
from .points import Point, anchor_ratio
from .records import Method, Record
from .results_store import ResultsStore
from .rule_sweep import BuiltRule, build_rule, decision_agreement, stage0_confidences, using_rule

#: Back-to-back pairs (point, full cascade) per batch behind each wall ratio.
BACK_TO_BACK_PAIRS = 3
#: The passes paired intervals compare with: which point is each one, and the ``full`` pass's keywords
#: that run it when that point is not measured in this invocation.
REFERENCES: dict[str, tuple[Callable[[Point], bool], dict]] = {
    "full": (lambda point: point.method == Method.FULL, {}),
    "stage0": (lambda point: point.method == Method.PREFIX and point.stages == 1, {"num_stages": 1}),
}


class Sweep:
    """The measurement context of one run's points (see module docstring). ``dense_model``: loads or
    trains the dense baseline (called once, when a point first needs it); ``train``: the split the
    other exit rules train on; ``validation``: the batches thresholds are calibrated on;
    ``risk_calibration``: risk control's own held-out batches (empty: it uses ``validation``)."""

    def __init__(
        self,
        config: ExperimentConfig,
        ensemble: Ensemble,
        *,
        train: Sequence,
        validation: Sequence,
        test: Sequence,
        risk_calibration: Sequence,
        conditions: dict,
        ranks: Ranks,
        dense_model: Callable[[], tuple[Ensemble, dict]],
        timing_batches: int,
        progress: bool = False,
        clock: Optional[PhaseClock] = None,
    ):
        self.config, self.ensemble, self.conditions, self.ranks = config, ensemble, conditions, ranks
        self.train, self.validation, self.test, self.risk_calibration = train, validation, test, risk_calibration
        self.progress = progress
        self.clock = clock or PhaseClock()
        self.anchor = anchor_ratio(config)
        self.timed_batches = test[:timing_batches]
        self.built_rules: dict[str, BuiltRule] = {}
        self._thresholds: dict[tuple[str, float], list[float]] = {}
        self._stage0_confidences: dict[str, torch.Tensor] = {}
        self.reuse = StageReuse(config.reuse_memory_mb << 20) if config.reuse_memory_mb else None
        self.interval_settings = IntervalSettings(config.interval_resamples, config.interval_level, config.seed)
        #: the window sums of the last pass ``cost`` measured, and of the references paired intervals read
        self.last_windows: tuple = ()
        self._reference_windows: dict[str, tuple] = {}
        self._load_dense = dense_model
        self._dense: Optional[tuple[Ensemble, dict]] = None
        self._cost_settings = dict(
            warmup=1,
            repeats=config.timing_repeats,
            fvcore=False,
            spans=False,
            conditions=conditions,
            timing_batches=timing_batches,
            clock=self.clock,
        )

    def reuse_for(self, point: Point) -> Optional[RuleReuse]:
        """What the passes over the scored batches keep under the point's exit rule (``stage_reuse``;
        None with ``reuse_memory_mb = 0``: every pass computes everything)."""
        return None if self.reuse is None else self.reuse.for_rule(point.exit_rule)

    def risk_reuse_for(self, point: Point) -> Optional[RuleReuse]:
        """The same for risk control's calibration batches (kept apart from the scored ones)."""
        reuse = self.reuse_for(point)
        return None if reuse is None else reuse.within("risk calibration")

    def cost(self, model: Ensemble, method: str, **kwargs) -> CostRecord:
        """``measure_cost`` of ``model`` on the scored batches with the run's settings (its window sums
        kept in ``last_windows`` for the point's intervals)."""
        cost = measure_cost(model, self.test, method, **self._cost_settings, **kwargs)
        self.last_windows = cost.quality.window_sums
        return cost

    def reference_windows(self, reference: str) -> tuple:
        """The window sums of a reference pass (``REFERENCES``: "full" depth, "stage0" alone): its point's,
        or, when that point is not measured in this invocation (a resumed run), a quality pass of its
        own, neither timed nor counted."""
        if reference not in self._reference_windows:
            self.cost(self.ensemble, "full", count_flops=False, timed=False, **REFERENCES[reference][1])
            self._reference_windows[reference] = self.last_windows
        return self._reference_windows[reference]

    def dense_model(self) -> tuple[Ensemble, dict]:
        """The dense baseline (in eval mode) and its training summary, loaded or trained on first use."""
        if self._dense is None:
            with self.clock("training_in_sweep"):
                model, summary = self._load_dense()
            self._dense = (model.eval(), summary)
        return self._dense

    def rule(self, spec: str) -> Optional[BuiltRule]:
        """The built rule for ``spec``; None for the rule the cascade was trained with (in place)."""
        if spec == self.config.exit_rule:
            return None
        if spec not in self.built_rules:
            with self.clock("training_in_sweep"):
                self.built_rules[spec] = self._build_rule(spec)
        return self.built_rules[spec]

    def _build_rule(self, spec: str) -> BuiltRule:
        config = self.config
        return build_rule(
            spec,
            self.ensemble,
            self.train,
            self.validation,
            config.classifier_target,
            config.seed,
            self.progress,
            max_epochs=config.max_epochs,
            max_steps_per_epoch=config.max_steps_per_epoch or None,
            max_tokens=config.exit_train_tokens or None,
            anchor_ratio=self.anchor,
        )

    def thresholds_at(self, ratio: float, spec: Optional[str] = None) -> list[float]:
        """Quantile thresholds on the validation batches under ``spec`` (default: the trained-with
        rule; the rule must be in place when called), calibrated for every swept ratio at once."""
        spec = spec or self.config.exit_rule
        if (spec, ratio) not in self._thresholds:
            ratios = sorted(set(self.config.hard_ratios) | {ratio})
            for r, thresholds in calibrate_sweep(self.ensemble, self.validation, ratios).items():
                self._thresholds[(spec, r)] = list(thresholds)
        return self._thresholds[(spec, ratio)]

    def agreement_with_max_prob(self, ratio: float, spec: str) -> float:
        """Stage-0 decisions of an approximate max-prob rule (in place) vs exact max_prob's, each at
        its own thresholds for ``ratio``, over the scored tokens."""
        cheap = self._stage0_confidences_under(spec)
        with using_rule(self.ensemble, BuiltRule("max_prob", ["max_prob"] * (len(self.ensemble) - 1))):
            exact = self._stage0_confidences_under("max_prob")
            reference = self.thresholds_at(ratio, "max_prob")[0]
        return decision_agreement(cheap, self.thresholds_at(ratio, spec)[0], exact, reference)

    def _stage0_confidences_under(self, spec: str) -> torch.Tensor:
        """Stage 0's confidences over the scored tokens under ``spec`` (in place), computed once per rule."""
        if spec not in self._stage0_confidences:
            self._stage0_confidences[spec] = stage0_confidences(self.ensemble, self.test)
        return self._stage0_confidences[spec]

    def risk_calibration_note(self) -> str:
        """Which batches risk control calibrated and tested on, and what else used them."""
        if self.config.risk_batches:
            return (
                f"held out: the last {self.config.risk_batches} validation batches, which nothing else uses "
                f"(training, early stopping, calibration and scoring never see them)"
            )
        return (
            "shared: the validation batches that also early-stopped training and calibrated the sweep "
            "(risk_batches = 0), so the guarantee rests on reused data"
        )

    def _calls(self, model: Ensemble, arguments: dict) -> list[Callable[[], object]]:
        """One call per timed batch of this rank that reruns a measured pass of ``model``
        (``arguments``: its ``forward_cascade`` keywords)."""
        return [
            lambda batch=batch: forward_cascade(
                model, batch["input_ids"], batch.get("attention_mask"), batch.get("targets"), **arguments
            )
            for batch in shard(self.timed_batches)
        ]

    def _full_calls(self) -> list[Callable[[], object]]:
        """The full cascade on this rank's timed batches, one call per batch."""
        return self._calls(self.ensemble, {"method": "full"})

    def measure(self, point: Point) -> Record:
        """The point's record (its exit rule in place), with ``wall_ratio_interleaved``: its pass over
        the full cascade's, each timed batch back to back (median over ranks of the median of
        ``BACK_TO_BACK_PAIRS`` pairs). Untimed points, the oracle and the full cascade itself (1 by
        definition) get none."""
        run = METHODS[point.method]
        with using_rule(self.ensemble, self.rule(point.exit_rule)):
            self.last_windows = ()
            record = run.measure(point, self)
            windows = self.last_windows
            for reference, (is_reference, _) in REFERENCES.items():
                if is_reference(point):
                    self._reference_windows[reference] = windows
            if windows:
                quality = quality_intervals(windows, self.reference_windows("full"), self.interval_settings)
                record.intervals = {**quality, **(record.intervals or {})}
            if point.method == Method.DENSE and windows:  # what the check "dense beats stage 0" reads
                stage0 = paired_difference(windows, self.reference_windows("stage0"), self.interval_settings, "ppl")
                record.intervals["difference_from_stage0"] = {"ppl": stage0}
            rerun = None
            if record.timed and point.method != Method.FULL and run.pass_arguments is not None:
                model = self.dense_model()[0] if point.method == Method.DENSE else self.ensemble
                rerun = self._calls(model, run.pass_arguments(point, record))
            if rerun is not None:
                self._wall_ratio(record, rerun)
        return record

    def _wall_ratio(self, record: Record, rerun: list) -> None:
        """The record's back-to-back wall ratio to the full cascade (median over ranks of each rank's
        median pair), the quartiles of every pair's ratio and a bootstrap interval of their median."""
        with evaluation_mode(self.ensemble), torch.inference_mode(), self.clock("timing"):
            # no warm-up of their own: the point's timed passes have just run, the full cascade's before
            mine, theirs = back_to_back_times(
                rerun, self._full_calls(), pairs=BACK_TO_BACK_PAIRS, device=self.ensemble.device, warmup=0
            )
        per_rank = all_ranks([a / b for a, b in zip(mine, theirs)])
        record.wall_ratio_interleaved = statistics.median(statistics.median(ratios) for ratios in per_rank)
        pairs = sorted(ratio for ratios in per_rank for ratio in ratios)
        record.wall_ratio_pairs = pairs
        record.wall_ratio_interval = median_interval(pairs, self.interval_settings)

    def run(
        self,
        points: Sequence[Point],
        store: ResultsStore,
        on_point: Optional[Callable[[str], None]] = None,
    ) -> None:
        """Measure every point ``store`` lacks, in order, appending each record as soon as it is
        measured (rank 0 writes); the cascade's calibrated thresholds are restored afterwards.
        ``on_point(point_id)`` is called after each (tests use it to interrupt a sweep)."""
        from tqdm.auto import tqdm

        calibrated = self.ensemble.thresholds
        with sharded(self.ranks):
            todo_ids = set(from_main([p.id for p in points if p.id not in store]))  # before rank 0 appends
            todo = [p for p in points if p.id in todo_ids]
            progress = self.progress and self.ranks.is_main
            for point in tqdm(todo, desc=f"sweep {self.config.name}", unit="point", disable=not progress):
                record = self.measure(point)
                if self.ranks.is_main:
                    store.append(record)
                if on_point is not None:
                    on_point(point.id)
        self.ensemble.set_thresholds(calibrated)
