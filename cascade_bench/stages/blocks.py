"""Block stages: early exit inside one Hugging Face causal LM (LEGO blocks; CALM, LayerSkip,
EE-LLM and DeeBERT exit this way).

A ``Block`` runs decoder layers ``[start, end)`` of a model and hands the **residual stream**
(before the final norm) to the next block. Its exit head is final norm + ``lm_head``: the
model's own modules (shared, no copy) or, when asked, a trainable copy of them for this block
alone. The last block always exits through the model's own norm and head, so blocks that never
exit compute exactly what the unsplit model computes.

To the router a Block looks like any stage: it takes (ids or states, attention mask, position
ids) and returns a ``StageOutput`` whose ``hidden`` is the state for the next stage and the input
of ``logits``. Everything family-specific (absolute vs rotary positions, the layers' cache
argument, embedding dropout) comes from ``families.LAYER_SLICE_RECIPES``.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..models.hf_compat import attention_type_mask, causal_mask, layer_cache_keyword
from ..models.masks import new_token_validity
from .exits import ExitRule
from .families import LAYER_TYPE_MASKS, attention_types, config_for_layers, family_parts, layer_slice_recipe
from .llm import check_threshold, logits_at_positions
from .stage import StageBase, StageOutput

#: How non-last blocks exit: through the model's own final norm + lm_head ("shared"), a trainable copy
#: of them ("own"), or the shared ones behind a trainable translator of the residual stream ("translator").
HEAD_KINDS = ("shared", "own", "translator")


class Translator(nn.Module):
    """An affine map of the residual stream, ``h + W h + b``, learned per exit layer so that the
    model's own final norm + lm_head read an earlier layer as they read the last one (the "tuned
    lens"). ``rank``: W = B A of that rank (2 d r parameters) instead of a full d x d matrix. Starts
    as the identity (the last factor and b are 0): untrained, the head is the shared one."""

    def __init__(self, hidden_size: int, rank: Optional[int] = None):
        super().__init__()
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank < hidden_size):
            raise ValueError(f"translator rank must be None (full) or an int in [1, {hidden_size}), got {rank!r}")
        self.rank = rank
        if rank is None:
            self.down = None
            self.linear = nn.Linear(hidden_size, hidden_size)
        else:
            self.down = nn.Linear(hidden_size, rank, bias=False)
            self.linear = nn.Linear(rank, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.linear(hidden if self.down is None else self.down(hidden))

    @property
    def macs_per_token(self) -> int:
        down = 0 if self.down is None else self.down.in_features * self.down.out_features
        return down + self.linear.in_features * self.linear.out_features


class ExitHead(nn.Module):
    """final norm, then ``lm_head``: (..., d) residual stream -> (..., V) logits; with a
    ``translator``, the stream is translated first. The translator may be any module that maps the
    stream of one position to a stream and counts its ``macs_per_token`` (a ``Translator``, or a
    trained per-token exit such as ``exit_adapters.MLPExit``)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, translator: Optional[nn.Module] = None):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.translator = translator

    def forward(self, hidden: Tensor) -> Tensor:
        if self.translator is not None:
            hidden = self.translator(hidden)
        return self.lm_head(self.norm(hidden))

    @property
    def macs_per_token(self) -> int:
        """Multiply-adds of one token's logits: d x V, plus the translator's own (d x d for a
        ``Translator``)."""
        weight = self.lm_head.weight
        return int(weight.shape[0] * weight.shape[1]) + (self.translator.macs_per_token if self.translator else 0)


class _BlockCacheView:
    """What a decoder layer sees of its block's cache: the layer's own index in the model
    (``layer_idx``) mapped to its index in the block, so each block's cache holds its layers only."""

    def __init__(self, cache, offset: int):
        self.cache = cache
        self.offset = offset

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        return self.cache.update(key_states, value_states, layer_idx - self.offset, *args, **kwargs)


class Block(StageBase, nn.Module):
    """Decoder layers ``[start, end)`` of a causal LM as one cascade stage (inference only).

    reads_tokens: this block owns the token embedding (and absolute positions): True for the block
    that starts the model. head: the exit head (final norm + lm_head). The source model's other parts
    are not registered here: the block's parameters are exactly the ones it runs.
    """

    def __init__(
        self,
        model: nn.Module,
        start: int,
        end: int,
        head: ExitHead,
        reads_tokens: bool,
        exit_rule: "str | Callable | ExitRule" = "max_prob",
        threshold: float = math.inf,
    ):
        super().__init__()
        recipe = layer_slice_recipe(model)
        parts = family_parts(model)
        total = len(parts.layers)
        for name, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"block {name} must be an int layer index, got {value!r}")
        if not 0 <= start < end <= total:
            raise ValueError(
                f"block layers [{start}, {end}) must satisfy 0 <= start < end <= {total} "
                f"(the model has {total} decoder layers)"
            )
        object.__setattr__(self, "source", model)  # a plain reference, not a registered submodule
        self.recipe = recipe
        self.start, self.end = start, end
        self.layers = nn.ModuleList(parts.layers[start:end])  # the same modules, not copies
        base = parts.base_model
        self.embedding = base.get_input_embeddings() if reads_tokens else None
        self.position_embedding = (
            getattr(base, recipe.position_embedding) if reads_tokens and recipe.position_embedding else None
        )
        self.embedding_dropout = (
            getattr(base, recipe.embedding_dropout) if reads_tokens and recipe.embedding_dropout else None
        )
        self.rotary = getattr(base, recipe.rotary) if recipe.rotary else None
        # per-layer attention types (sliding vs full, ...): each gets its own mask and, where the rotary
        # embedding takes a layer type (local vs global RoPE), its own positions
        types = attention_types(model.config)
        self.layer_types = tuple(types[start:end]) if types is not None else None
        self.rotary_per_type = (
            self.rotary is not None and "layer_type" in inspect.signature(self.rotary.forward).parameters
        )
        self.cache_keyword = layer_cache_keyword(self.layers[0])  # what this transformers release calls it
        self.head = head
        self.exit_rule = exit_rule
        self.threshold = check_threshold(threshold)
        # The cost model reads layer shapes and the layer count from this block's config.
        self._config = config_for_layers(model.config, start, end - start)
        self.eval()

    # -- the Stage members a block computes its own way (the rest: StageBase) -------------------------
    @property
    def config(self):
        """The source model's config with ``num_hidden_layers`` = this block's layers."""
        return self._config

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def lm_head(self) -> nn.Module:
        return self.head.lm_head

    @property
    def reads_tokens(self) -> bool:
        return self.embedding is not None

    @property
    def head_macs_per_token(self) -> int:
        """Multiply-adds of this block's exit head per token whose logits it computes."""
        return self.head.macs_per_token

    # -- inference ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        capture_input_state: bool = False,
        logits_at: Optional[Tensor] = None,
        cache=None,
        use_cache: bool = False,
    ) -> StageOutput:
        """Run the block's layers on token ids (R, L) (first block) or residual states (R, L, d).

        For the first block ``inputs_embeds`` are token embeddings (absolute positions are still
        added), as in Hugging Face; for later blocks they are the residual stream. Returns the
        residual stream after the last layer (R, L, d), not normed; the rest as ``LLM.forward``.
        ``cache``: a cache holding this block's layers only (index 0 = layer ``start``).
        """
        from transformers import DynamicCache

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if not self.reads_tokens:
                raise ValueError(
                    f"block [{self.start}, {self.end}) reads the residual stream (inputs_embeds); "
                    f"only the model's first block reads token ids"
                )
            hidden = self.embedding(input_ids)
        else:
            hidden = inputs_embeds
        if use_cache and cache is None:
            cache = DynamicCache()
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(seen, seen + hidden.shape[1], device=hidden.device)[None]
        if self.position_embedding is not None:
            hidden = hidden + self.position_embedding(position_ids).to(hidden.dtype)
        if self.embedding_dropout is not None:
            hidden = self.embedding_dropout(hidden)
        masks, rotary = self._masks(hidden, attention_mask, cache, position_ids), self._rotary(hidden, position_ids)
        extra = {}
        if cache is not None:
            extra[self.cache_keyword] = _BlockCacheView(cache, self.start)
        if self.recipe.padding_argument is not None:
            extra[self.recipe.padding_argument] = new_token_validity(attention_mask, hidden.shape[1])
        input_state = None
        for i, layer in enumerate(self.layers):
            if capture_input_state and i == len(self.layers) - 1:
                input_state = hidden
            kind = self.layer_types[i] if self.layer_types is not None else None
            if rotary is not None:
                extra["position_embeddings"] = rotary[kind] if self.rotary_per_type else rotary
            hidden = layer(hidden, attention_mask=masks[kind], position_ids=position_ids, use_cache=use_cache, **extra)
        return StageOutput(
            hidden=hidden,
            input_state=input_state,
            logits=logits_at_positions(self, hidden, logits_at),
            cache=cache if use_cache else None,
        )

    def _masks(self, hidden: Tensor, attention_mask, cache, position_ids) -> dict:
        """{layer type: mask} for this block's layers ({None: mask} when the config lists no types)."""
        config = self.source.config
        if self.layer_types is None:
            return {None: causal_mask(config, hidden, attention_mask, cache, position_ids)}
        window = getattr(config, "sliding_window", None)
        prepared = attention_mask is not None and attention_mask.dim() == 4  # a finished mask: used as it is
        if prepared and "sliding_attention" in self.layer_types and attention_mask.shape[-1] > (window or 0):
            raise ValueError(
                f"block [{self.start}, {self.end}) has sliding-window layers (window {window}) and got a prepared "
                f"(rows, 1, queries, {attention_mask.shape[-1]}) mask from a cache with gaps (padding, or rows that "
                f"skipped a stage), which knows causality and real slots but not the window: longer than the "
                f"window, it would let sliding layers see too far; decode without gaps or within {window} tokens"
            )
        return {
            kind: attention_type_mask(kind, LAYER_TYPE_MASKS[kind], config, hidden, attention_mask, cache, position_ids)
            for kind in dict.fromkeys(self.layer_types)
        }

    def _rotary(self, hidden: Tensor, position_ids: Tensor):
        """The rotary (cos, sin) for ``position_ids``, per layer type when the embedding takes one."""
        if self.rotary is None:
            return None
        if not self.rotary_per_type:
            return self.rotary(hidden, position_ids=position_ids)
        return {kind: self.rotary(hidden, position_ids, kind) for kind in dict.fromkeys(self.layer_types)}

    def logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits (..., V) of residual states (..., d): final norm, then lm_head."""
        return self.head(hidden)

    def new_stage_after(self, num_layers: int, exit_rule) -> "Block":
        """A block of ``num_layers`` freshly initialised layers (the source config, continuing its
        per-layer type list after this block; torch's current RNG) reading this block's residual
        stream; its exit head is a trainable copy of this block's."""
        from transformers import AutoModelForCausalLM

        config = config_for_layers(self.source.config, self.end, num_layers)
        fresh = AutoModelForCausalLM.from_config(config).to(device=self.device, dtype=self.dtype)
        return Block(
            fresh,
            0,
            num_layers,
            ExitHead(copy.deepcopy(self.head.norm), copy.deepcopy(self.head.lm_head)),
            reads_tokens=False,
            exit_rule=exit_rule,
        )

    def extra_repr(self) -> str:
        return (
            f"family={self.source.config.model_type}, layers=[{self.start}, {self.end}), "
            f"hidden={self.hidden_size}, vocab={self.vocab_size}, exit_rule={self.exit_rule.name}, "
            f"threshold={self.threshold}"
        )


def cut_into_blocks(
    model: nn.Module,
    boundaries: Sequence[int],
    exit_rule: "str | Callable | ExitRule" = "max_prob",
    thresholds: Optional[Sequence[float]] = None,
    heads: str = "shared",
    translator_rank: Optional[int] = None,
) -> list[Block]:
    """Blocks of ``model`` cut before each layer index in ``boundaries``.

    boundaries: strictly increasing layer indices in (0, num_layers): ``[4, 8]`` on 12 layers gives
    blocks [0, 4), [4, 8), [8, 12); ``[]`` gives the whole model as one block. heads: "shared" (every
    block exits through the model's final norm + lm_head), "own" (non-last blocks get a trainable
    copy, initialised from the model's) or "translator" (non-last blocks read the shared norm +
    lm_head through a ``Translator`` of their own, of ``translator_rank`` (None = full), initialised
    to the identity). thresholds: one per non-last block (default +inf).
    """
    layer_slice_recipe(model)  # first: an unsupported family is named before anything else
    parts = family_parts(model)
    total = len(parts.layers)
    if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
        raise TypeError(f"boundaries must be a sequence of layer indices, got {boundaries!r}")
    cuts = list(boundaries)
    if any(isinstance(b, bool) or not isinstance(b, int) for b in cuts):
        raise TypeError(f"boundaries must be ints (layer indices), got {cuts!r}")
    if any(not 0 < b < total for b in cuts) or any(b >= c for b, c in zip(cuts, cuts[1:])):
        raise ValueError(
            f"boundaries must be strictly increasing layer indices in (0, {total}) for a model with "
            f"{total} decoder layers, got {cuts!r}"
        )
    if heads not in HEAD_KINDS:
        raise ValueError(f"heads must be one of {HEAD_KINDS}, got {heads!r}")
    spans = list(zip([0] + cuts, cuts + [total]))
    if thresholds is None:
        thresholds = [math.inf] * (len(spans) - 1)
    thresholds = [check_threshold(t) for t in thresholds]
    if len(thresholds) == len(spans) - 1:
        thresholds.append(math.inf)
    if len(thresholds) != len(spans):
        raise ValueError(f"expected {len(spans) - 1} thresholds for {len(spans)} blocks, got {len(thresholds)}")
    shared = ExitHead(parts.final_norm, model.get_output_embeddings())
    if layer_slice_recipe(model).derived:
        check_derived_layout(model, shared)
    blocks = []
    for k, ((start, end), threshold) in enumerate(zip(spans, thresholds)):
        last = k == len(spans) - 1
        if heads == "shared" or last:
            head = shared
        elif heads == "own":
            head = ExitHead(copy.deepcopy(shared.norm), copy.deepcopy(shared.lm_head))
        else:
            weight = shared.lm_head.weight
            translator = Translator(weight.shape[1], translator_rank).to(device=weight.device, dtype=weight.dtype)
            head = ExitHead(shared.norm, shared.lm_head, translator)
        blocks.append(Block(model, start, end, head, reads_tokens=k == 0, exit_rule=exit_rule, threshold=threshold))
    return blocks


#: Families whose derived layout reproduced the unsplit model's logits in this process (checked once each).
_LAYOUTS_CHECKED: set = set()
#: Tokens of the layout check: at least this many, past the sliding window where there is one, at most the
#: second number (a window longer than that is exercised by the tiny-config tests, not at the cut).
LAYOUT_CHECK_TOKENS = 12
LAYOUT_CHECK_MAX_TOKENS = 600


@torch.no_grad()
def check_derived_layout(model: nn.Module, head: ExitHead) -> None:
    """A family cut by the standard layout (not an explicit recipe) must give the unsplit model's
    logits: blocks [0, 1) and [1, L) (or one block) on a few tokens, against ``model`` itself.
    ValueError naming the family when they differ (a step of its forward the layout does not
    know: an embedding scaled in the forward, extra norms, soft-capped logits, ...)."""
    model_type = model.config.model_type
    checked = (model_type, model.config.to_json_string(use_diff=False))  # a config can take another path
    if checked in _LAYOUTS_CHECKED:
        return
    total = len(family_parts(model).layers)
    weight = head.lm_head.weight
    vocab = int(weight.shape[0])
    # past the sliding window where there is one (so the window is exercised), up to a bounded length
    window = getattr(model.config, "sliding_window", None) or 0
    limit = getattr(model.config, "max_position_embeddings", None) or LAYOUT_CHECK_MAX_TOKENS
    length = min(max(LAYOUT_CHECK_TOKENS, window + 4), LAYOUT_CHECK_MAX_TOKENS, limit)
    ids = (torch.arange(length, device=weight.device) * 7919 + 3).remainder(vocab)[None]
    cuts = [(0, total)] if total < 2 else [(0, 1), (1, total)]
    blocks = [Block(model, a, b, head, reads_tokens=a == 0) for a, b in cuts]
    was_training = model.training
    model.eval()
    try:
        hidden = blocks[0](input_ids=ids).hidden
        for block in blocks[1:]:
            hidden = block(inputs_embeds=hidden).hidden
        mine, theirs = blocks[-1].logits(hidden).float(), model(input_ids=ids).logits.float()
    except Exception as error:  # a layer that takes other arguments than the layout passes
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(
            f"cannot cut a {model_type!r} model into blocks: it looks like the standard decoder layout, but its "
            f"layers do not run as blocks ({type(error).__name__}: {first_line}); "
            f"add an explicit entry to cascade_bench.stages.families.LAYER_SLICE_RECIPES"
        ) from error
    finally:
        model.train(was_training)
    tolerance = (1e-4 if weight.dtype == torch.float32 else 3e-2) * max(1.0, float(theirs.abs().max()))
    difference = float((mine - theirs).abs().max())
    if not difference <= tolerance:
        raise ValueError(
            f"cannot cut a {model_type!r} model into blocks: it looks like the standard decoder layout, but "
            f"blocks of it give logits {difference:.3g} away from the unsplit model's (tolerance {tolerance:.3g}); "
            f"its forward does something the layout does not (an embedding scaled in the forward, extra norms, "
            f"capped logits): add an explicit entry to cascade_bench.stages.families.LAYER_SLICE_RECIPES"
        )
    _LAYOUTS_CHECKED.add(checked)


def head_sharing(blocks: Sequence[Block]) -> str:
    """``"shared"`` when every non-last block exits through the last block's own head module,
    ``"translator"`` when they read its norm and lm_head through translators of their own, else
    ``"own"`` (each non-last block has its own copy, as after ``extend`` or ``heads="own"``)."""
    last = blocks[-1].head
    if all(block.head is last for block in blocks[:-1]):
        return "shared"
    if all(
        isinstance(block.head.translator, Translator)
        and block.head.norm is last.norm
        and block.head.lm_head is last.lm_head
        for block in blocks[:-1]
    ):
        return "translator"
    return "own"


def exit_through(block: Block, exit_module: nn.Module) -> None:
    """Make ``block`` exit through ``exit_module`` (a trained per-token exit: a ``Translator``, an
    ``MLPExit``) in front of the norm and lm_head its head reads now (the model's own, shared)."""
    block.head = ExitHead(block.head.norm, block.head.lm_head, exit_module)


def assemble_model(blocks: Sequence[Block]) -> nn.Module:
    """The inverse of ``cut_into_blocks``: one Hugging Face causal LM whose decoder layers are the
    blocks' layers in order (copied), with block 0's token embedding (and absolute positions) and
    the last block's final norm and ``lm_head``. Blocks of one model give that model back; a cascade
    grown with ``extend`` gives the grown model (its head untied from the embedding when they
    differ). Non-last blocks' own exit heads are not part of it."""
    from transformers import AutoModelForCausalLM

    blocks = list(blocks)
    if not blocks or not all(isinstance(b, Block) for b in blocks):
        raise TypeError(f"assemble_model takes Blocks, got {[type(b).__name__ for b in blocks]}")
    first, last = blocks[0], blocks[-1]
    if not first.reads_tokens or any(b.reads_tokens for b in blocks[1:]):
        raise ValueError(
            "assemble_model needs block 0 to read token ids and every later block to read the residual "
            "stream (blocks of one model in order)"
        )
    config = copy.deepcopy(first.source.config)
    config.num_hidden_layers = sum(b.num_layers for b in blocks)
    config.tie_word_embeddings = last.head.lm_head.weight is first.embedding.weight
    model = AutoModelForCausalLM.from_config(config).to(device=first.device, dtype=first.dtype)
    parts = family_parts(model)
    base = parts.base_model
    with torch.no_grad():
        base.get_input_embeddings().load_state_dict(first.embedding.state_dict())
        if first.position_embedding is not None:
            getattr(base, first.recipe.position_embedding).load_state_dict(first.position_embedding.state_dict())
        layers = [layer for block in blocks for layer in block.layers]
        for target, layer in zip(parts.layers, layers):
            target.load_state_dict(layer.state_dict())
        parts.final_norm.load_state_dict(last.head.norm.state_dict())
        model.get_output_embeddings().load_state_dict(last.head.lm_head.state_dict())
    return model.eval()
