"""A cascade as an lm-evaluation-harness model: ``lm_eval --model cascade_bench --model_args ...``.

Every request runs with true early exit (``routing.passes``, ``routing.generation``): the
harness metrics are those of the routed cascade at its thresholds, and the model keeps the
toolkit's cost columns over every token it scored (``EarlyExitLM.cost_summary()``; written to
``cost_json`` when given, and attached as ``results["cascade_bench"]`` by ``evaluate``).

Model arguments (``key=value`` pairs; lists with ``;``):

- ``cascade``: a folder written by ``save_ensemble`` (``cascade-bench run`` keeps the trained one
  under ``models/<key>/cascade``), with its tokenizer; or
- ``pretrained`` + ``boundaries`` (e.g. ``4;8``): a local Hugging Face checkpoint cut into blocks
  that exit through its own head, ``tokenizer`` its tokenizer folder (default: ``pretrained``);
- ``thresholds``: per non-last stage, overriding the saved ones (``inf`` = never exit);
- ``max_length`` (default: the smallest ``max_position_embeddings`` of the stages, at most 2048),
  ``batch_size`` (default 8), ``device``, ``dtype``, ``exit_rule`` (blocks of ``pretrained``),
  ``max_gen_toks`` (default 256), ``cost_json``.

``loglikelihood``: context + continuation (left-truncated to ``max_length + 1`` tokens), summed NLL
of the continuation at each token's exit stage and whether every continuation token is that
stage's argmax. ``loglikelihood_rolling``: the harness's own disjoint rolling windows (one token
of context, EOS before the document), which score exactly what ``data.windows.sliding_windows``
scores with window = stride = ``max_length`` over EOS + document. ``generate_until``: greedy
early-exit generation, cut at the first stop string.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..data.storage import write_json_atomic
from ..measure.analytic import head_macs_of, routed_cost
from ..measure.environment import check_device
from ..measure.flops import count_pass_flops
from ..routing.generation import generate
from ..routing.passes import forward_cascade
from ..stages.ensemble import Ensemble
from ..stages.families import register_own_families

DTYPES = ("float32", "bfloat16", "float16")
logger = logging.getLogger(__name__)


def _floats(value, what: str) -> list[float]:
    items = [value] if isinstance(value, (int, float)) else [v for v in str(value).split(";") if v.strip()]
    try:
        return [float(v) for v in items]
    except ValueError:
        raise ValueError(f"{what} must be numbers separated by ';', got {value!r}") from None


class CostTally:
    """Tokens, exits and FLOPs summed over every routed pass of an evaluation."""

    def __init__(self, layers_per_stage: Sequence[int]):
        self.layers = list(layers_per_stage)
        self.scored = 0
        self.exited = [0] * len(self.layers)
        self.entered = [0] * len(self.layers)
        self.flops = 0
        self.flops_analytic = 0
        self.flops_full_depth = 0
        self.generated_tokens = 0
        self.generated_exits = [0] * len(self.layers)

    def add_pass(self, out, counted: int, configs, head_macs=None) -> None:
        scored = out.scored
        self.scored += int(scored.sum())
        for k in range(len(self.layers)):
            self.exited[k] += int((out.exit_stage[scored] == k).sum())
            self.entered[k] += int((out.exit_stage[scored] >= k).sum())
        self.flops += counted
        self.flops_analytic += sum(
            c.total for c in routed_cost(configs, out.stage_batch_shapes, out.head_tokens, head_macs=head_macs)
        )
        rows, length = out.exit_stage.shape
        full = [[(rows, length)]] * len(configs)
        heads = [0] * (len(configs) - 1) + [int((out.exit_stage >= 0).sum())]
        self.flops_full_depth += sum(c.total for c in routed_cost(configs, full, heads, head_macs=head_macs))

    def summary(self) -> dict:
        tokens = max(self.scored, 1)
        return {
            "scored_tokens": self.scored,
            "exit_ratios": [e / tokens for e in self.exited],
            "layer_cost": sum(n * l for n, l in zip(self.entered, self.layers)) / (tokens * sum(self.layers)),
            "flops_counted": self.flops,
            "flops_analytic": self.flops_analytic,
            "flops_full_depth": self.flops_full_depth,
            "flop_ratio_to_full_depth": self.flops_analytic / self.flops_full_depth if self.flops_full_depth else None,
            "generated_tokens": self.generated_tokens,
            "generation_exit_ratios": [e / max(self.generated_tokens, 1) for e in self.generated_exits],
            "note": "scored tokens of loglikelihood requests; full depth = the same padded batches through every "
            "stage, one head per token at the last (analytic, equal to counted where both exist)",
        }


@register_model("cascade_bench")
class EarlyExitLM(LM):
    """An ``Ensemble`` with its tokenizer, answering harness requests with early exit (module docstring)."""

    def __init__(
        self,
        cascade: Optional[str] = None,
        pretrained: Optional[str] = None,
        boundaries=None,
        tokenizer: Optional[str] = None,
        thresholds=None,
        exit_rule: str = "max_prob",
        max_length: Optional[int] = None,
        batch_size=8,
        max_batch_size=None,
        device: Optional[str] = None,
        dtype: str = "float32",
        max_gen_toks: int = 256,
        cost_json: Optional[str] = None,
        ensemble: Optional[Ensemble] = None,
        harness_device: Optional[str] = None,
        **unused,
    ):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if device is None and harness_device is not None:  # lm_eval's own --device (default cuda:0)
            try:
                device = str(check_device(harness_device, dtype))
            except ValueError as error:
                logger.warning("%s; running on cpu (put device=... in --model_args to require one)", error)
        device = str(check_device(device or "cpu", dtype))
        torch_dtype = getattr(torch, dtype)
        self.ensemble, self.tokenizer = self._load(
            cascade, pretrained, boundaries, tokenizer, exit_rule, device, torch_dtype, ensemble
        )
        self.thresholds = (
            _floats(thresholds, "thresholds") if thresholds is not None else list(self.ensemble.thresholds[:-1])
        )
        if len(self.thresholds) != len(self.ensemble) - 1:
            raise ValueError(
                f"thresholds: expected {len(self.ensemble) - 1} (one per non-last stage), got {len(self.thresholds)}"
            )
        limits = [s.max_positions for s in self.ensemble if s.max_positions]
        self.max_length = int(max_length) if max_length is not None else min([2048, *limits])
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.max_gen_toks = int(max_gen_toks)
        self.cost_json = Path(cost_json) if cost_json else None
        self.costs = CostTally(self.ensemble.layers_per_stage)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no EOS token; the harness needs one to start documents")
        self.eos_token_id = int(eos)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "EarlyExitLM":
        """``--model_args`` plus lm_eval's own options; its ``--device`` (default ``cuda:0``) is a preference
        (``harness_device``), a ``device`` in the model arguments a requirement."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "EarlyExitLM":
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "device" in extra:
            extra["harness_device"] = extra.pop("device")
        from ..data.renamed_keys import read_renamed

        return cls(**read_renamed(arg_dict, "lm_eval --model_args"), **extra)

    @staticmethod
    def _load(cascade, pretrained, boundaries, tokenizer, exit_rule, device, dtype, ensemble):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..training.persistence import load_ensemble, load_saved_tokenizer

        if ensemble is not None:  # Python callers: an Ensemble and a tokenizer object
            if tokenizer is None or isinstance(tokenizer, str):
                raise ValueError("with ensemble=..., pass the tokenizer object as tokenizer=...")
            return ensemble.to(device=device, dtype=dtype).eval(), tokenizer
        if (cascade is None) == (pretrained is None):
            raise ValueError(
                "model_args need exactly one of cascade=FOLDER (a saved cascade) or pretrained=FOLDER "
                "with boundaries=I;J"
            )
        if cascade is not None:
            from ..experiment.pipeline import saved_cascade

            folder = saved_cascade(cascade)
            if not folder.is_dir():
                raise ValueError(f"cascade={cascade!r}: no such folder (expected one written by save_ensemble)")
            return load_ensemble(folder, device=device, dtype=dtype).eval(), load_saved_tokenizer(folder)
        if boundaries is None:
            raise ValueError("pretrained=... needs boundaries=I;J (the layer indices to cut blocks before)")
        register_own_families()
        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=dtype).to(device).eval()
        cuts = [int(b) for b in _floats(boundaries, "boundaries")]
        return (
            Ensemble.from_blocks(model, cuts, exit_rule=exit_rule).eval(),
            AutoTokenizer.from_pretrained(tokenizer or pretrained),
        )

    # -- what the harness reads ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.eos_token_id

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def cost_summary(self) -> dict:
        return {
            **self.costs.summary(),
            "thresholds": list(self.thresholds),
            "layers_per_stage": list(self.ensemble.layers_per_stage),
        }

    def _write_costs(self) -> None:
        if self.cost_json is not None:
            write_json_atomic(self.cost_json, self.cost_summary())

    # -- scoring -----------------------------------------------------------------------------------
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed NLL -> log-likelihood, all greedy) of each continuation given its context."""
        results: list[tuple[float, bool]] = []
        device = self.ensemble.device
        configs = [stage.config for stage in self.ensemble]
        for start in range(0, len(pairs), self.batch_size):
            group = pairs[start : start + self.batch_size]
            rows = []
            for context, continuation in group:
                if not continuation:
                    raise ValueError("a loglikelihood request has an empty continuation")
                whole = (context + continuation)[-(self.max_length + 1) :]
                rows.append((whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
            length = max(len(ids) for ids, _, _ in rows)
            ids = torch.zeros(len(rows), length, dtype=torch.long)
            targets = torch.full((len(rows), length), -100, dtype=torch.long)
            mask = torch.zeros(len(rows), length, dtype=torch.long)
            for i, (inp, tgt, n) in enumerate(rows):
                ids[i, : len(inp)], mask[i, : len(inp)] = torch.tensor(inp), 1
                targets[i, len(inp) - n : len(inp)] = torch.tensor(tgt[-n:])  # the continuation's tokens only
            ids, targets, mask = ids.to(device), targets.to(device), mask.to(device)
            with torch.inference_mode():
                counted, out = count_pass_flops(
                    lambda probe: forward_cascade(
                        self.ensemble, ids, mask, targets, thresholds=self.thresholds, probe=probe
                    ),
                    len(self.ensemble),
                )
            self.costs.add_pass(out, counted.total, configs, head_macs_of(self.ensemble))
            for i in range(len(rows)):
                scored = out.scored[i]
                results.append((-float(out.nll[i][scored].double().sum()), bool(out.correct[i][scored].all())))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            context_ids = self.tok_encode(context) if context else [self.eos_token_id]
            pairs.append((context_ids, self.tok_encode(continuation)))
        results = self._score(pairs)
        self._write_costs()
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for request in requests:
            (text,) = request.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.eos_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            totals.append(sum(ll for ll, _ in self._score(windows)))
        self._write_costs()
        return totals

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for request in requests:
            context, options = request.args
            options = dict(options or {})
            until = options.pop("until", None) or [self.tokenizer.decode([self.eos_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            budget = int(options.pop("max_gen_toks", self.max_gen_toks))
            if options.get("do_sample"):
                raise ValueError("generate_until: only greedy decoding (do_sample=False) is supported")
            prompt = (self.tok_encode(context) or [self.eos_token_id])[-(self.max_length - budget) :]
            ids = torch.tensor([prompt], device=self.ensemble.device)
            with torch.inference_mode():
                out = generate(
                    self.ensemble,
                    ids,
                    max_new_tokens=budget,
                    thresholds=self.thresholds,
                    eos_token_id=self.eos_token_id,
                )
            produced = out.tokens[0].tolist()
            self.costs.generated_tokens += out.decode_tokens
            for k, n in enumerate(out.exit_counts):
                self.costs.generated_exits[k] += int(n)
            text = self.tok_decode([t for t in produced if t != self.eos_token_id])
            cut = min((text.find(stop) for stop in until if stop and stop in text), default=len(text))
            outputs.append(text[:cut])
        self._write_costs()
        return outputs


def evaluate(model_args: "str | dict", tasks: Sequence[str], include_path: Optional[str] = None, **kwargs) -> dict:
    """``lm_eval.simple_evaluate`` on this model (tasks from ``include_path`` too, offline); the
    results dict gets the cost columns under ``"cascade_bench"``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = (
        model_args
        if isinstance(model_args, dict)
        else dict(part.split("=", 1) for part in model_args.split(",") if part)
    )
    model = EarlyExitLM(**args)
    manager = TaskManager(include_path=include_path) if include_path else None
    results = simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, **kwargs)
    results["cascade_bench"] = model.cost_summary()
    return json.loads(json.dumps(results, default=str)) if results is not None else results


__all__ = ["EarlyExitLM", "evaluate"]
