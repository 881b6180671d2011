"""A cascade to build for a bench, as data: ``CascadeSpec`` names one of the five ways to get one
(a preset's stages, a preset as one model in blocks, a pretrained model cut into blocks, a saved
trained cascade, stage folders) and ``build`` makes it, in eval mode, with a line saying where it
came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..measure.environment import check_device
from ..stages.ensemble import Ensemble
from ..stages.families import register_own_families
from ..stages.llm import LLM
from ..stages.presets import build_blocks, build_ensemble
from ..training.persistence import load_ensemble


@dataclass(frozen=True)
class CascadeSpec:
    """One way to get a cascade. ``model`` + ``boundaries``: a pretrained causal LM (a
    ``save_pretrained`` folder) cut before those layers; ``cascade``: a saved trained cascade folder;
    ``stages``: stage folders loaded with ``from_pretrained``; else ``preset`` stages of ``layers``
    layers, or with ``as_blocks`` one model of ``sum(layers)`` layers cut into blocks of ``layers``."""

    preset: str = "gpt2-cpu"
    layers: Sequence[int] = (4, 4)
    exit_rule: str = "max_prob"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    seed: int = 0
    model: Optional[Path] = None
    boundaries: Optional[Sequence[int]] = None
    as_blocks: bool = False
    cascade: Optional[Path] = None
    stages: Sequence[Path] = ()

    def build(self) -> tuple[Ensemble, "str | list[str]"]:
        """The cascade (eval mode) and where it came from; ValueError for an inconsistent spec or a
        cascade the benches cannot feed (one stage, or a vocabulary smaller than the byte ids)."""
        if (self.model is None) != (self.boundaries is None):
            raise ValueError("--model and --boundaries go together (a checkpoint folder and where to cut it)")
        torch.set_num_threads(self.threads)
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype {self.dtype!r}: expected a torch floating-point type such as 'float32'")
        check_device(self.device, dtype)
        ensemble, origin = self._built(dtype)
        if len(ensemble) < 2:
            raise ValueError(f"early exit needs at least two stages, got {len(ensemble)}")
        if ensemble.vocab_size < 256:
            raise ValueError(
                f"the embedded text is fed as byte ids 0..255; the cascade's vocab size {ensemble.vocab_size} is "
                "smaller"
            )
        return ensemble.eval(), origin

    def _built(self, dtype: torch.dtype) -> tuple[Ensemble, "str | list[str]"]:
        layers = list(self.layers)
        if self.model is not None:
            return self._cut_model(dtype)
        if self.as_blocks:
            ensemble = build_blocks(
                self.preset, layers, exit_rule=self.exit_rule, seed=self.seed, device=self.device, dtype=dtype
            )
            shape = "/".join(map(str, layers))
            origin = f"preset {self.preset} as one {sum(layers)}-layer model in blocks of {shape}, seed {self.seed}"
            return ensemble, origin
        if self.cascade is not None:
            if not (self.cascade / "cascade.json").is_file():
                raise ValueError(
                    f"{self.cascade} is not a saved cascade (no cascade.json); `cascade-bench run` saves its "
                    f"trained cascade under models/<training key>/cascade"
                )
            return load_ensemble(self.cascade, device=self.device, dtype=dtype), f"trained cascade {self.cascade}"
        if self.stages:
            torch.manual_seed(self.seed)
            stages = [
                LLM.from_pretrained(path, exit_rule=self.exit_rule).to(self.device, dtype) for path in self.stages
            ]
            return Ensemble(stages), [str(path) for path in self.stages]
        ensemble = build_ensemble(
            self.preset, layers, exit_rule=self.exit_rule, seed=self.seed, device=self.device, dtype=dtype
        )
        return ensemble, f"preset {self.preset}, layers {'+'.join(map(str, layers))}, seed {self.seed}"

    def _cut_model(self, dtype: torch.dtype) -> tuple[Ensemble, str]:
        from transformers import AutoModelForCausalLM

        if not Path(self.model).is_dir():
            raise ValueError(f"missing model folder {self.model}")
        register_own_families()
        model = AutoModelForCausalLM.from_pretrained(self.model, dtype=dtype).to(self.device).eval()
        boundaries = list(self.boundaries)
        ensemble = Ensemble.from_blocks(model, boundaries, exit_rule=self.exit_rule)
        return ensemble, f"{self.model} cut before layers {boundaries}"
