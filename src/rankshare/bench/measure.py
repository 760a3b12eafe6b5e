"""How each variant is measured: interleaved step and forward times, training memory, merged inference, files."""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .setups import Setup, Variant, weight_sharing_copy


def train_step(variant: Variant, inputs: dict) -> None:
    """Forward, backward and an AdamW step (where there is anything to update)."""
    batch = {k: v for k, v in inputs.items() if k != "labels"}
    loss = F.cross_entropy(variant.model(**batch).logits.float(), inputs["labels"])
    loss.backward()
    if variant.optimiser is not None:
        variant.optimiser.step()
        variant.optimiser.zero_grad(set_to_none=True)


@torch.no_grad()
def forward(model, inputs: dict) -> torch.Tensor:
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def interleaved_times(actions: dict[str, callable], repeats: int, warmup: int) -> dict[str, dict]:
    """Seconds per call of each action: ``warmup`` untimed rounds, then ``repeats`` rounds in which every
    action runs once, in an order that rotates from round to round so that none always runs first."""
    names = list(actions)
    for _ in range(warmup):
        for name in names:
            actions[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            actions[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: {"min": min(s), "median": statistics.median(s), "repeats": len(s)} for name, s in samples.items()}


def training_memory(variant: Variant, inputs: dict) -> dict[str, int]:
    """Bytes a training step holds beyond the frozen weights.

    activations: the distinct tensors autograd saves for backward (weights excluded), counted when saved;
    gradients and AdamW's two moments: 4 bytes each per trainable parameter (float32).
    """
    model = variant.model
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(model(**batch).logits.float(), inputs["labels"])
    loss.backward()
    model.zero_grad(set_to_none=True)
    trainable = sum(p.numel() * p.element_size() for p in variant.trainable)
    return {"activations": sum(saved.values()), "gradients": trainable, "optimiser": 2 * trainable,
            "total": sum(saved.values()) + 3 * trainable}


def adapter_file(variant: Variant) -> dict[str, int] | None:
    """Size of the saved adapter against 4 bytes per adapter parameter."""
    if not variant.adapter_parameters:
        return None
    with tempfile.TemporaryDirectory() as folder:
        variant.model.save_pretrained(folder)
        path = next(Path(folder).glob("*.safetensors"))
        return {"bytes": path.stat().st_size, "parameter_bytes": 4 * variant.adapter_parameters}


def merged_inference(setup: Setup, lotr: Variant, mor: Variant, inputs: dict, repeats: int, warmup: int) -> dict:
    """Inference of the untouched base against merged LoTR and MoR (constant gates 1/N), with output checks."""
    base = setup.model.eval()
    reference_lotr = forward(lotr.model.eval(), inputs)
    merged_lotr = _merged_copy(lotr, gates=None)
    num_experts = next(iter(mor.model.adapter_layers().values())).num_experts
    gates = torch.full((num_experts,), 1 / num_experts)
    merged_mor = _merged_copy(mor, gates=gates)
    constant = _constant_gates_output(mor, inputs)
    times = interleaved_times({
        "base": lambda: forward(base, inputs),
        "LoTR merged": lambda: forward(merged_lotr, inputs),
        "MoR merged (gates 1/N)": lambda: forward(merged_mor, inputs),
    }, repeats, warmup)
    lotr.model.train()
    return {
        "times": times,
        "lotr_max_abs_difference": (forward(merged_lotr, inputs) - reference_lotr).abs().max().item(),
        "mor_max_abs_difference": (forward(merged_mor, inputs) - constant).abs().max().item(),
        "output_scale": reference_lotr.abs().max().item(),
    }


def _merged_copy(variant: Variant, gates):
    """merge_and_unload on a real copy (merging writes into the weights, which the variants share)."""
    return copy.deepcopy(variant.model).merge_and_unload(gates=gates).eval()


@torch.no_grad()
def _constant_gates_output(mor: Variant, inputs: dict) -> torch.Tensor:
    """The unmerged MoR with every router set to zero, so every token's gates are 1/N."""
    model = weight_sharing_copy(mor.model)  # shares the adapter tensors too; the routers are replaced below
    for layer in model.adapter_layers().values():
        layer.router = torch.nn.Parameter(torch.zeros_like(layer.router))
    return forward(model.eval(), inputs)
