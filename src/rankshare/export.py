"""Export to PEFT's LoRA format, which PEFT, vLLM's multi-LoRA serving, TGI and llama.cpp's converters read.

Every rankshare update is a LoRA update in disguise (METHODS.md, "Exact conversion to plain LoRA")::

    LoTR            B' = U,                                  A' = s G_l Vᵀ                 r' = r
    MoR, gates γ    B' = s Σ_i γ_i diag(b_i) B diag(a_i),    A' = A                        r' = r
    MoE-LoRA, γ     B' = [γ_1 B_1 … γ_N B_N],                A' = s [A_1; …; A_N]          r' = N r

PEFT computes ``(lora_alpha / r') · B' A'``: the export sets ``lora_alpha = r'`` (scale 1). A method whose layers have
ranks of their own gets PEFT's ``rank_pattern`` and ``alpha_pattern``. The file holds per-layer factors, LoRA's size;
rankshare's own files stay compact.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from pathlib import Path

import safetensors.torch
import torch

from .atomic_files import replace_together
from .errors import RankshareError
from .layer import is_conv1d
from .model import AdaptedModel, Gates

PEFT_PREFIX = "base_model.model."


def export_peft(model: AdaptedModel, directory: str | Path, gates: Gates | None = None,
                adapter_name: str | None = None) -> Path:
    """Write adapter ``adapter_name`` (the active one by default) as a PEFT LoRA adapter folder that
    ``peft.PeftModel.from_pretrained(base, directory)`` loads; routed mixtures need ``gates``: one weight per expert
    for every layer, or ``{module name: weights}`` per layer (as ``AdaptedModel.merge``). Both files replace
    earlier ones only once both are written in full."""
    import peft

    if not isinstance(model, AdaptedModel):
        raise RankshareError(f"export_peft() takes a rankshare AdaptedModel, got {type(model).__name__}; a PEFT model "
                             "is already in PEFT's format (save_pretrained).")
    name = adapter_name or model.active_adapter
    if name not in model.adapter_configs:
        raise RankshareError(f"No adapter named {name!r}; this model has {sorted(model.adapter_configs) or 'none'}.")
    config = model.adapter_configs[name]
    if config.merge_needs_gates and gates is None:
        raise RankshareError(
            f"A {config.title} adapter routes each token differently, and a plain LoRA cannot: give gates (one "
            "weight per expert, e.g. a task's mean routing) to export that constant mixture."
        )
    per_layer = model.layer_gates(gates, name)
    tensors, ranks, layouts = {}, {}, set()
    with torch.no_grad():
        for module, layer in model.adapter_layers(name).items():
            up, down = layer.lora_factors(per_layer[module])
            # A' (r', d_in) and B' (d_out, r'), copied: LoTR's U is one tensor for its whole group, and each layer
            # gets its own in the file.
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = down.to(torch.float32, copy=True).contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = up.to(torch.float32, copy=True).contiguous()
            ranks[module] = down.shape[0]
            layouts.add(is_conv1d(layer.base_layer))
        saved = model.adapter_state_dict(name)
        for module in model.modules_to_save_of(name):
            tensors.update({f"{PEFT_PREFIX}{key}": t.detach().contiguous() for key, t in saved.items()
                            if key.startswith(module + ".")})
    if len(layouts) > 1:
        raise RankshareError("This adapter adapts nn.Linear and Conv1D layers at once; PEFT's fan_in_fan_out is one "
                             "setting for all. Export two adapters, one per kind of layer.")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RankshareError(f"Tensor {key!r} holds NaN or inf, so nothing was exported; the adapter has "
                                 "diverged.")
    rank = Counter(ranks.values()).most_common(1)[0][0]  # one rank per method (r, or N r), or the usual one
    # Other ranks by full module name: PEFT (>= 0.15) matches a pattern key against the end of a module's name.
    others = {re.escape(module): r for module, r in ranks.items() if r != rank}
    lora = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=sorted(ranks),
                           rank_pattern=others, alpha_pattern=others,
                           fan_in_fan_out=layouts == {True}, modules_to_save=model.modules_to_save_of(name) or None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        lora.save_pretrained(scratch)  # PEFT writes its own config
        config_bytes = (Path(scratch) / "adapter_config.json").read_bytes()
    replace_together({directory / "adapter_model.safetensors": safetensors.torch.save(tensors),
                      directory / "adapter_config.json": config_bytes})
    return directory
