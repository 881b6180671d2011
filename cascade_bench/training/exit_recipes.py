"""Recipes that teach a frozen pretrained model to exit early, trained side by side on one budget.

Every recipe starts from the same least-squares translators (``exit_translators``), fitted on the
shared training windows, so each row of the comparison says what its training buys on top of them;
an untrained recipe predicts exactly what ``lstsq`` predicts (the added branches start at zero).

- ``lstsq``: the translators as fitted (no training).
- ``lstsq+kl``: the translators trained by ``topk_kl`` to the full model's top-k distribution.
- ``mlp``: ``stages.exit_adapters.MLPExit`` on each translator (EE-Tuning's MLP exit), same loss.
- ``adapter``: ``stages.exit_adapters.AttentionAdapter`` before each translator (Kangaroo's
  one-layer adapter: norm + self-attention over the window, copied from the layer after the cut).
- ``lora``: ``training.lora`` adapters on every projection of the trunk; the loss is the KL at one
  exit layer per step (the layers take turns, LayerSkip's rotation), read through the frozen
  translators, plus the KL of the adapted model's final layer to the original's (the distillation
  term that keeps full depth close to the original). The adapted model is a different model: its
  own full-depth PPL and agreement with the original are reported beside the exits, and lossless
  self-speculative decoding with it would be lossless with respect to the adapted model, not the
  original. ``close()`` takes the adapters out again (the base weights are never changed).

``train_recipe`` trains any of them the same way: AdamW, one exit layer per step (the layers take
turns), a check on the validation windows after ``steps_per_check`` steps per layer (the start is
check 0), and the time budget. Exits that share nothing keep, layer by layer, the weights of their
own best check (top-1 agreement with the full model on validation) and stop once no layer has
improved for ``patience`` checks; the LoRA trunk, shared by every exit, keeps the check of best
mean agreement. Whatever the budget, no exit of the frozen-trunk recipes ends below its
least-squares start on validation (the LoRA trunk's kept check is the best on the mean only).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..measure.layer_exits import LayerExit, LayerStates, exit_curve
from ..stages.exit_adapters import AttentionAdapter, MLPExit
from ..stages.families import family_parts
from .exit_recipe_specs import RecipeBudget
from .loops import EarlyStopping, EpochStats, train_epochs
from .lora import add_lora, lora_norm, lora_parameters, remove_lora
from .topk_kl import topk_kl
from .window_states import WindowStates

#: MLP exit hidden width, as a multiple of the model width.
MLP_WIDTH = 2
#: LoRA rank and alpha on the trunk's projections.
LORA_RANK, LORA_ALPHA = 8, 16.0
#: Weight of the final layer's KL to the original model in the LoRA recipe.
FINAL_WEIGHT = 1.0
#: AdamW learning rates: of the translators, of the parts a recipe adds, of the LoRA adapters. Chosen on
#: validation agreement at SmolLM2-135M's layer 20 after 32 steps of 1,024 tokens: 0.456 / 0.459 / 0.497
#: (KL translators / MLP exit / adapter) at these rates against 0.435 / 0.447 / 0.459 at a third of them.
TRANSLATOR_LR, ADDED_LR, LORA_LR = 3e-4, 1e-3, 3e-4


class ExitRecipe:
    """A recipe's trainable exits over the frozen ``model``'s candidate ``layers``.

    ``head_inputs(batch, layers)`` gives, per layer, the (rows, length, d) stream the model's own
    final norm + lm_head read (differentiable while training); a recipe that also returns the key
    ``num_layers`` gives the adapted model's last-layer stream (LoRA)."""

    name = "lstsq"
    trains = False
    independent_exits = True  # one exit per layer, nothing shared: each layer keeps its own best check

    def __init__(self, model: nn.Module, layers: Sequence[int], translators: dict[int, nn.Module]):
        for parameter in model.parameters():  # frozen: no step computes a gradient of its weights
            parameter.requires_grad_(False)
        self.model = model
        self.layers = tuple(layers)
        self.exits = nn.ModuleDict(
            {str(layer): self.make_exit(layer, copy.deepcopy(translators[layer])) for layer in layers}
        )
        if not self.trains:
            for parameter in self.exits.parameters():
                parameter.requires_grad_(False)

    def make_exit(self, layer: int, translator: nn.Module) -> nn.Module:
        return translator

    def modules(self) -> list[nn.Module]:
        return [self.exits]

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.exits.parameters()), "lr": TRANSLATOR_LR}]

    def trainable_parameters(self) -> int:
        """Parameters the recipe learns: trained ones, or for ``lstsq`` the fitted ones."""
        return sum(
            p.numel()
            for group in self.parameter_groups()
            for p in group["params"]
            if p.requires_grad or not self.trains
        )

    def head_inputs(self, batch: WindowStates, layers: Sequence[int]) -> dict[int, Tensor]:
        return {layer: self.exits[str(layer)](batch.states[:, :, batch.layer_index(layer)]) for layer in layers}

    def extra(self) -> dict:
        """What the record says of this recipe beyond the common figures."""
        return {}

    def close(self) -> None:
        """Undo what the recipe changed in ``model`` (nothing but LoRA changes it)."""


class KLTranslators(ExitRecipe):
    name = "lstsq+kl"
    trains = True


class MLPExits(ExitRecipe):
    name = "mlp"
    trains = True

    def make_exit(self, layer: int, translator: nn.Module) -> nn.Module:
        return MLPExit(translator, MLP_WIDTH * translator.linear.out_features)

    def parameter_groups(self) -> list[dict]:
        translators = [p for e in self.exits.values() for p in e.translator.parameters()]
        added = [p for e in self.exits.values() for m in (e.norm, e.up, e.down) for p in m.parameters()]
        return [{"params": translators, "lr": TRANSLATOR_LR}, {"params": added, "lr": ADDED_LR}]


class AttentionAdapters(ExitRecipe):
    name = "adapter"
    trains = True

    def make_exit(self, layer: int, translator: nn.Module) -> nn.Module:
        return AttentionAdapter(self.model, layer, translator)

    def parameter_groups(self) -> list[dict]:
        translators = [p for e in self.exits.values() for p in e.translator.parameters()]
        added = [p for e in self.exits.values() for p in e.layer.parameters()]
        return [{"params": translators, "lr": TRANSLATOR_LR}, {"params": added, "lr": ADDED_LR}]

    def head_inputs(self, batch: WindowStates, layers: Sequence[int]) -> dict[int, Tensor]:
        return {
            layer: self.exits[str(layer)](batch.states[:, :, batch.layer_index(layer)], batch.attention_mask)
            for layer in layers
        }


class TrunkLoRA(ExitRecipe):
    name = "lora"
    trains = True
    independent_exits = False  # one adapted trunk under every exit

    def __init__(self, model: nn.Module, layers: Sequence[int], translators: dict[int, nn.Module]):
        super().__init__(model, layers, translators)
        for parameter in self.exits.parameters():
            parameter.requires_grad_(False)  # the translators stay as fitted; the trunk adapts to them
        self.adapters = add_lora(model, LORA_RANK, LORA_ALPHA)
        self.updates = nn.ModuleList([part for adapter in self.adapters for part in (adapter.down, adapter.up)])
        self.parts = family_parts(model)
        self.num_layers = len(self.parts.layers)

    def modules(self) -> list[nn.Module]:
        return [self.updates]  # the low-rank factors only: early stopping copies these, not the base weights

    def parameter_groups(self) -> list[dict]:
        return [{"params": lora_parameters(self.adapters), "lr": LORA_LR}]

    def head_inputs(self, batch: WindowStates, layers: Sequence[int]) -> dict[int, Tensor]:
        captured = {}
        hook = self.parts.final_norm.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
        try:
            out = self.parts.base_model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=True,
                use_cache=False,
            )
        finally:
            hook.remove()
        inputs = {
            layer: self.exits[str(layer)](out.hidden_states[layer]) for layer in layers if layer < self.num_layers
        }
        if self.num_layers in layers:
            inputs[self.num_layers] = captured["x"]
        return inputs

    def extra(self) -> dict:
        return {
            "lora_rank": LORA_RANK,
            "lora_alpha": LORA_ALPHA,
            "final_weight": FINAL_WEIGHT,
            "update_norm": lora_norm(self.adapters),
            "translators": "frozen (least squares on the original model)",
        }

    def close(self) -> None:
        remove_lora(self.model)
        for module in self.model.modules():
            module.eval()


class LayerwiseStopping:
    """Early stopping per exit layer for recipes whose exits are independent: each layer keeps the
    weights of its own best check (``EarlyStopping`` on 1 - its validation agreement); training
    stops once every layer has gone ``patience`` checks without a new best."""

    def __init__(self, exits: Sequence[nn.Module], patience: int):
        self.stoppers = [EarlyStopping([module], patience) for module in exits]
        self.stop_reason = "epoch cap"

    def update(self, scores: Sequence[float], epoch: int) -> bool:
        for stopper, score in zip(self.stoppers, scores):
            stopper.update(score, epoch)
        if all(stopper.waited >= stopper.patience for stopper in self.stoppers):
            self.stop_reason = "early stopping"
            return True
        return False

    def restore(self) -> None:
        for stopper in self.stoppers:
            stopper.restore()

    @property
    def best_checks(self) -> list[int]:
        return [max(stopper.best_epoch, 0) for stopper in self.stoppers]


RECIPE_CLASSES = {cls.name: cls for cls in (ExitRecipe, KLTranslators, MLPExits, AttentionAdapters, TrunkLoRA)}


def build_recipe(name: str, model: nn.Module, layers: Sequence[int], translators: dict[int, nn.Module]) -> ExitRecipe:
    if name not in RECIPE_CLASSES:
        raise ValueError(f"exit recipe must be one of {list(RECIPE_CLASSES)}, got {name!r}")
    return RECIPE_CLASSES[name](model, layers, translators)


def final_head(model: nn.Module):
    """hidden (..., d) -> logits: the model's own final norm, then its lm_head (shared, frozen)."""
    norm, lm_head = family_parts(model).final_norm, model.get_output_embeddings()
    return lambda hidden: lm_head(norm(hidden))


def step_loss(recipe: ExitRecipe, batch: WindowStates, layer: int) -> tuple[Tensor, int]:
    """Mean top-k KL to the full model at ``layer`` over the batch's scored positions (plus, for a
    recipe that adapts the trunk, ``FINAL_WEIGHT`` times the final layer's)."""
    head = final_head(recipe.model)
    final = getattr(recipe, "num_layers", None)
    asked = (layer,) if final is None else (layer, final)
    inputs = recipe.head_inputs(batch, asked)
    scored = batch.scored
    teacher = batch.top_logprobs[scored], batch.top_ids[scored]
    loss = topk_kl(head(inputs[layer][scored]), *teacher).mean()
    if final is not None:
        loss = loss + FINAL_WEIGHT * topk_kl(head(inputs[final][scored]), *teacher).mean()
    return loss, int(scored.sum())


def recipe_layers(recipe: ExitRecipe, with_final: bool = False) -> tuple[int, ...]:
    """The recipe's exit layers, and with ``with_final`` a trunk recipe's last layer too."""
    return recipe.layers + ((recipe.num_layers,) if with_final and hasattr(recipe, "num_layers") else ())


@torch.inference_mode()
def scored_head_inputs(recipe: ExitRecipe, states: WindowStates, layers: Sequence[int], rows: int = 4) -> LayerStates:
    """The recipe's head inputs at ``layers`` for the scored positions of ``states``, flattened."""
    gathered: dict[int, list] = {layer: [] for layer in layers}
    for start in range(0, states.windows, rows):
        part = states.rows(torch.arange(start, min(start + rows, states.windows)))
        inputs = recipe.head_inputs(part, layers)
        for layer in layers:
            gathered[layer].append(inputs[layer][part.scored])
    return LayerStates(
        layers=tuple(layers),
        num_layers=states.num_layers,
        states=torch.stack([torch.cat(gathered[layer]) for layer in layers], dim=1),
        targets=states.targets[states.scored],
        final_argmax=states.final_argmax[states.scored],
        final_nll=states.final_nll[states.scored],
    )


def evaluate_recipe(recipe: ExitRecipe, states: WindowStates, with_final: bool = False) -> list[LayerExit]:
    """Per layer (and, with ``with_final`` for a trunk recipe, the adapted model's last layer): PPL,
    accuracy and agreement with the original full-depth prediction on the scored positions."""
    flat = scored_head_inputs(recipe, states, recipe_layers(recipe, with_final))
    head = final_head(recipe.model)
    return exit_curve(flat, lambda layer, hidden: head(hidden))


@dataclass(frozen=True)
class RecipeHistory:
    """One recipe's training: per check the tokens trained on so far (summed over layers), the mean
    training loss since the last check and the validation agreement per layer; per layer the check
    kept (every layer the same one for a trunk recipe), why training stopped and its seconds."""

    recipe: str
    layers: tuple[int, ...]
    tokens_seen: tuple[int, ...]
    train_loss: tuple[Optional[float], ...]
    validation_agreement: tuple[tuple[float, ...], ...]
    best_checks: tuple[int, ...]
    stop_reason: str
    seconds: float
    trainable_parameters: int

    @property
    def converged(self) -> bool:
        return self.stop_reason in ("early stopping", "closed form")

    @property
    def mean_agreement(self) -> tuple[float, ...]:
        """Per check, the validation agreement averaged over the layers."""
        return tuple(sum(check) / len(check) for check in self.validation_agreement)

    @property
    def kept_agreement(self) -> float:
        """The validation agreement of the kept weights, averaged over the layers."""
        kept = [self.validation_agreement[check][i] for i, check in enumerate(self.best_checks)]
        return sum(kept) / len(kept)

    def summary(self) -> dict:
        return {
            **asdict(self),
            "converged": self.converged,
            "mean_agreement": list(self.mean_agreement),
            "kept_agreement": self.kept_agreement,
        }


def train_recipe(
    recipe: ExitRecipe,
    train: WindowStates,
    validation: WindowStates,
    budget: RecipeBudget,
    progress: bool = True,
) -> RecipeHistory:
    """Train ``recipe`` as the module docstring says; an untrained recipe returns a one-check history."""
    began = time.perf_counter()
    start = tuple(point.agreement for point in evaluate_recipe(recipe, validation))
    layers, learned = recipe.layers, recipe.trainable_parameters()
    if not recipe.trains:
        return RecipeHistory(
            recipe.name, layers, (0,), (None,), (start,), (0,) * len(layers), "closed form", 0.0, learned
        )
    torch.manual_seed(budget.seed)
    optimizer = torch.optim.AdamW(recipe.parameter_groups(), weight_decay=0.0)
    independent = recipe.independent_exits
    stopping = (
        LayerwiseStopping([recipe.exits[str(layer)] for layer in layers], budget.patience)
        if independent
        else EarlyStopping(recipe.modules(), budget.patience)
    )
    generator = torch.Generator().manual_seed(budget.seed)
    order: list[int] = []
    counter = {"steps": 0, "tokens": 0}
    capped = {"yes": False}
    deadline = began + budget.seconds
    seen, losses, agreements = [], [], []

    def next_rows() -> Tensor:
        nonlocal order
        if len(order) < budget.batch_windows:
            order += torch.randperm(train.windows, generator=generator).tolist()
        picked, order = order[: budget.batch_windows], order[budget.batch_windows :]
        return torch.tensor(picked)

    def checks():
        check = 0
        while check == 0 or time.perf_counter() < deadline:
            if budget.max_checks is not None and check > budget.max_checks:
                capped["yes"] = True
                return
            yield check
            check += 1

    def steps(check: int):
        for _ in range(budget.steps_per_check * len(layers) if check else 0):
            if time.perf_counter() >= deadline:  # the last check scores what the budget paid for
                return
            layer = layers[counter["steps"] % len(layers)]
            counter["steps"] += 1
            rows = next_rows()
            yield lambda rows=rows, layer=layer: _counted(step_loss(recipe, train.rows(rows), layer), counter)

    def validate(check: int, stats: EpochStats):
        agreed = start if check == 0 else tuple(point.agreement for point in evaluate_recipe(recipe, validation))
        seen.append(counter["tokens"])
        losses.append(stats.mean_loss if stats.tokens else None)  # None: no step before this check
        agreements.append(agreed)
        if progress:
            print(
                f"{recipe.name} check {check}: {counter['tokens']:,} tokens, train loss "
                f"{'n/a (the start)' if losses[-1] is None else format(losses[-1], '.4f')}, "
                "validation agreement " + ", ".join(f"{layer}: {a:.3f}" for layer, a in zip(layers, agreed)),
                flush=True,
            )
        disagreement = [1.0 - a for a in agreed]
        return disagreement if independent else sum(disagreement) / len(disagreement)

    train_epochs(recipe.modules(), optimizer, checks(), steps, validate, stopping, grad_clip=1.0)
    for group in recipe.parameter_groups():
        for parameter in group["params"]:
            parameter.requires_grad_(False)
    best = stopping.best_checks if independent else [max(stopping.best_epoch, 0)] * len(layers)
    return RecipeHistory(
        recipe=recipe.name,
        layers=layers,
        tokens_seen=tuple(seen),
        train_loss=tuple(losses),
        validation_agreement=tuple(agreements),
        best_checks=tuple(best),
        stop_reason="early stopping"
        if stopping.stop_reason == "early stopping"
        else ("check cap" if capped["yes"] else "time budget"),
        seconds=time.perf_counter() - began,
        trainable_parameters=learned,
    )


def _counted(result: tuple[Tensor, int], counter: dict) -> tuple[Tensor, int]:
    counter["tokens"] += result[1]
    return result


__all__ = [
    "RECIPE_CLASSES",
    "ExitRecipe",
    "RecipeHistory",
    "build_recipe",
    "final_head",
    "evaluate_recipe",
    "recipe_layers",
    "scored_head_inputs",
    "step_loss",
    "train_recipe",
]
