"""The memory-layer causal LM as a Hugging Face model: token embedding, the configured layers,
final LayerNorm, LM head.

Memory state: a forward starts from ``memory_state`` (a dict from ``get_memory_state``; None =
empty memories, or the model's own state when ``carry_memory`` is set) and leaves the memories
after its last segment in ``output.memory_state`` and in the model (``get_memory_state()``).
The state is a dict of tensors and ints: ``torch.save`` it on one machine, ``torch.load`` and
``set_memory_state`` it on another, and the next forward gives the same outputs there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..hf_compat import cache_keyword, causal_mask
from ..masks import new_token_validity
from .attention import RotaryEmbedding
from .compressive import CompressiveMemory
from .configuration import MEMORY_LAYER_KINDS, MemoryLMConfig
from .layers import LAYER_CLASSES, MemoryContext


@dataclass
class MemoryLMOutput(CausalLMOutputWithPast):
    """Hugging Face's causal-LM output plus the memories after this forward."""

    memory_state: Optional[dict] = None


def _plain(state):
    """Memories as nested dicts/lists of tensors and ints (what ``torch.save`` stores)."""
    if isinstance(state, CompressiveMemory):
        return state.state()
    if isinstance(state, dict):
        return {k: _plain(v) for k, v in state.items()}
    return [_plain(v) for v in state]


def _memories(plain, device=None):
    """Inverse of ``_plain`` (tensors moved to ``device`` when given)."""
    if isinstance(plain, dict) and "memory" in plain:
        state = CompressiveMemory.from_state(plain)
        if device is not None:
            state.memory, state.normaliser = state.memory.to(device), state.normaliser.to(device)
        return state
    if isinstance(plain, dict):
        return {k: _memories(v, device) for k, v in plain.items()}
    return [_memories(v, device) for v in plain]


class MemoryLMPreTrainedModel(PreTrainedModel):
    config_class = MemoryLMConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _no_split_modules = ["Layer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class MemoryLMModel(MemoryLMPreTrainedModel):
    """Embedding, layers, final norm: (B, T) ids -> (B, T, d) states."""

    def __init__(self, config: MemoryLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        types = config.layer_kinds[: config.num_hidden_layers]
        self.layers = nn.ModuleList(LAYER_CLASSES[t](config, i) for i, t in enumerate(types))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        head_dim = config.hidden_size // config.num_attention_heads
        rotary = int(head_dim * config.rotary_pct) // 2 * 2
        self.rotary = RotaryEmbedding(rotary, config.rope_theta)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        cache=None,
        inputs_embeds: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        memory: Optional[MemoryContext] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        past_key_values=None,
    ) -> BaseModelOutputWithPast:
        """(B, T) ids or (B, T, d) embeddings -> final normed states (B, T, d).

        ``cache``: the key/value cache to attend over and extend (``past_key_values`` is the same
        argument under the name transformers used before 5.24; give one of them).
        ``output_hidden_states``: the embeddings, the residual stream after each layer but the
        last, and the final normed states (Hugging Face's convention). Any other keyword is a
        TypeError: nothing passed to this model is silently ignored."""
        from transformers import DynamicCache

        cache = _one_cache(cache, past_key_values)
        _refuse_attentions(output_attentions)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None:
            cache = DynamicCache()
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(seen, seen + hidden.shape[1], device=hidden.device)[None]
        position_ids = position_ids.expand(hidden.shape[0], -1)
        mask = causal_mask(self.config, hidden, attention_mask, cache, position_ids)
        padding = new_token_validity(attention_mask, hidden.shape[1])
        rotary = self.rotary(hidden, position_ids)
        states = [hidden]
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=rotary,
                cache=cache if use_cache else None,
                padding_mask=padding,
                memory=memory,
            )
            states.append(hidden)
        hidden = self.norm(hidden)
        out = BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(states[:-1]) + (hidden,) if output_hidden_states else None,
            **{cache_keyword(): cache if use_cache else None},
        )
        return out if return_dict is not False else out.to_tuple()


def _one_cache(cache, past_key_values):
    """The cache given under either of its names (ValueError when given under both)."""
    if cache is not None and past_key_values is not None:
        raise ValueError(
            "pass the cache once: as cache (transformers >= 5.24) or as past_key_values (earlier releases), not both"
        )
    return cache if cache is not None else past_key_values


def _refuse_attentions(output_attentions) -> None:
    if output_attentions:
        raise ValueError(
            "output_attentions=True: memory-layer models do not return attention weights (memory reads have none)"
        )


class MemoryLMForCausalLM(MemoryLMPreTrainedModel, GenerationMixin):
    """The causal LM, with the memory-state API (see the module docstring)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MemoryLMConfig):
        super().__init__(config)
        self.model = MemoryLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.carry_memory = False
        self._memory_state: Optional[dict] = None
        self._start_from_set_state = False  # set_memory_state: the next forward starts from that state
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @property
    def memory_layers(self) -> list[int]:
        types = self.config.layer_kinds[: self.config.num_hidden_layers]
        return [i for i, t in enumerate(types) if t in MEMORY_LAYER_KINDS]

    # -- memory state ------------------------------------------------------------------------------
    def reset_memory(self) -> None:
        """Forget the memories: the next forward starts empty."""
        self._memory_state = None
        self._start_from_set_state = False

    def get_memory_state(self) -> Optional[dict]:
        """The memories after the last forward (or as set): {layer index: memories}, plain tensors
        (detached, on their device), or None when there are none yet."""
        return self._memory_state

    def set_memory_state(self, state: Optional[dict]) -> None:
        """Use ``state`` (from ``get_memory_state``, possibly saved and loaded elsewhere) as the
        memories: the next forward starts from it (without ``carry_memory`` too; later forwards
        carry their memories on only with ``carry_memory``). None: the next forward starts empty."""
        if state is not None:
            unknown = sorted(set(int(k) for k in state) - set(self.memory_layers))
            if unknown:
                raise ValueError(
                    f"memory state has layers {unknown}, but this model's memory layers are {self.memory_layers}"
                )
        self._memory_state = state
        self._start_from_set_state = True

    def memory_state_bytes(self, state: Optional[dict] = None) -> int:
        """Bytes of a memory state (default: the model's own)."""
        state = self._memory_state if state is None else state

        def size(node):
            if isinstance(node, Tensor):
                return node.numel() * node.element_size()
            if isinstance(node, dict):
                return sum(size(v) for v in node.values())
            if isinstance(node, (list, tuple)):
                return sum(size(v) for v in node)
            return 0

        return size(state) if state is not None else 0

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        cache=None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        memory_state: Optional[dict] = None,
        logits_to_keep: int = 0,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        past_key_values=None,
        update_memory=None,
    ) -> MemoryLMOutput:
        """Logits (B, T, V) (the last ``logits_to_keep`` positions when it is > 0), the loss of
        ``labels`` (next-token, -100 ignored), the cache and the memories after this forward.

        ``cache`` / ``past_key_values``: one argument under transformers' new and old name (see
        ``MemoryLMModel.forward``). ``memory_state``: start from these memories (default: the
        state ``set_memory_state`` gave, else the carried one with ``carry_memory``, else empty).
        The seed's ``update_memory`` has no counterpart: a forward always returns the memories after
        it in ``output.memory_state``; to leave the model's own state as it was, take it with
        ``get_memory_state`` and ``set_memory_state`` it back. Any other keyword is a TypeError."""
        if update_memory is not None:
            raise TypeError(
                "update_memory (the seed's name) is not an argument here: a forward always returns the "
                "memories after it in output.memory_state; to keep the model's own state, take it with "
                "get_memory_state() and give it back with set_memory_state()"
            )
        cache = _one_cache(cache, past_key_values)
        _refuse_attentions(output_attentions)
        carried = self.carry_memory or self._start_from_set_state
        start = memory_state if memory_state is not None else (self._memory_state if carried else None)
        self._start_from_set_state = False
        device = (input_ids if input_ids is not None else inputs_embeds).device
        context = MemoryContext({int(k): _memories(v, device) for k, v in (start or {}).items()})
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            memory=context,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        state = {i: _plain(s) for i, s in context.states.items()} or None
        self._memory_state = state
        result = MemoryLMOutput(
            loss=loss,
            logits=logits,
            memory_state=state,
            hidden_states=out.hidden_states,
            **{cache_keyword(): out.get(cache_keyword())},
        )
        return result if return_dict is not False else result.to_tuple()


def register_memory_lm() -> None:
    """Register the family with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        AutoConfig.register(MemoryLMConfig.model_type, MemoryLMConfig)
    except ValueError:  # already registered
        pass
    for auto, model in ((AutoModel, MemoryLMModel), (AutoModelForCausalLM, MemoryLMForCausalLM)):
        try:
            auto.register(MemoryLMConfig, model)
        except ValueError:
            pass
