"""LoRA as PEFT implements it (Hu et al., arXiv 2106.09685): the baseline every other method is compared with.

::

    ΔW = s · B A        A: (r, d_in)  B: (d_out, r)  per layer,   y = W x + b + s · B (A x)

Trainable parameters per layer: ``r (d_in + d_out)`` (no bias). PEFT builds, saves and merges it
(``peft.get_peft_model``, ``PeftModel.from_pretrained``): rankshare registers it as a method so that the
planner, the command line and the study treat it as any other, and its files are PEFT's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import ExternalAdapterConfig, Recipe, register


@register
@dataclass
class PeftLoraConfig(ExternalAdapterConfig):
    """PEFT's LoRA: rank r, alpha (s = alpha / r), target_modules; no dropout."""

    method = "lora"
    title = "LoRA"
    recipes = {
        "classify": Recipe(3e-3, "power-minilm-sentiment/lora", rank=10),
        "text_to_label": Recipe(3e-3, "deep-smollm2-sentiment/lora", rank=4),
        "sft": Recipe(3e-3, "multitask-smollm2-skills/lora", rank=12),
    }

    def num_trainable_parameters(self, shapes: dict[str, tuple[int, int]]) -> int:
        return sum(self.rank * (d_in + d_out) for d_out, d_in in shapes.values())

    def attach(self, model: nn.Module, modules_to_save: list[str], adapter_name: str = "default") -> nn.Module:
        import peft

        config = peft.LoraConfig(r=self.rank, lora_alpha=self.scale * self.rank, lora_dropout=0.0,
                                 target_modules=self.target_modules, modules_to_save=modules_to_save or None)
        return peft.get_peft_model(model, config, adapter_name=adapter_name)

    @classmethod
    def load(cls, base_model: nn.Module, directory: str, is_trainable: bool = False) -> nn.Module:
        import peft

        return peft.PeftModel.from_pretrained(base_model, str(directory), is_trainable=is_trainable)
