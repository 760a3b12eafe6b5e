"""How each variant is measured: interleaved step and forward times, training memory, merged inference, files;
and many tasks on one base: a batch that mixes tasks, and what k tasks hold."""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..targets import group_targets
from .setups import Setup, Variant, lotr_tasks, peft_lora_tasks, task_names, weight_sharing_copy

TASKS, TASK_COUNTS = 8, (1, 2, 4, 8, 16)


def classification_loss(model, inputs: dict) -> torch.Tensor:
    batch = {k: v for k, v in inputs.items() if k != "labels"}
    return F.cross_entropy(model(**batch).logits.float(), inputs["labels"])


def lm_loss(model, inputs: dict) -> torch.Tensor:
    """A causal LM's own loss over its labelled tokens (instruction tuning: the responses')."""
    return model(**inputs).loss


def train_step(variant: Variant, inputs: dict, loss=classification_loss) -> None:
    """Forward, backward and an AdamW step (where there is anything to update)."""
    loss(variant.model, inputs).backward()
    if variant.optimiser is not None:
        variant.optimiser.step()
        variant.optimiser.zero_grad(set_to_none=True)


@torch.no_grad()
def forward(model, inputs: dict, adapter_names: list[str] | None = None) -> torch.Tensor:
    """Logits of the batch; ``adapter_names``: one adapter per example (a mixed batch)."""
    mixed = {} if adapter_names is None else {"adapter_names": adapter_names}
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **mixed).logits


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
    merged_lotr = merged_copy(lotr, gates=None)
    num_experts = next(iter(mor.model.adapter_layers().values())).num_experts
    gates = torch.full((num_experts,), 1 / num_experts)
    merged_mor = merged_copy(mor, gates=gates)
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


def merged_copy(variant: Variant, gates):
    """merge_and_unload on a real copy (merging writes into the weights, which the variants share)."""
    return copy.deepcopy(variant.model).merge_and_unload(gates=gates).eval()


@torch.no_grad()
def _constant_gates_output(mor: Variant, inputs: dict) -> torch.Tensor:
    """The unmerged MoR with every router set to zero, so every token's gates are 1/N."""
    model = weight_sharing_copy(mor.model)  # shares the adapter tensors too; the routers are replaced below
    for layer in model.adapter_layers().values():
        layer.router = torch.nn.Parameter(torch.zeros_like(layer.router))
    return forward(model.eval(), inputs)


def mixed_batch(setup: Setup, rank: int, inputs: dict, repeats: int, warmup: int) -> dict:
    """A batch whose rows go round-robin to TASKS tasks: LoTR adapters on one basis against PEFT's LoRA mixed
    batch (``adapter_names``) and against the same batch through one LoTR adapter; with output checks."""
    names = task_names(TASKS)
    rows = [names[i % TASKS] for i in range(setup.batch)]
    lotr, lora = lotr_tasks(setup, rank, TASKS).eval(), peft_lora_tasks(setup, rank, TASKS).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # cores away from zero, so that the tasks differ and the check below means something
        for name in names:
            for layer in lotr.adapter_layers(name).values():
                layer.core.copy_(torch.randn(layer.core.shape, generator=generator))
    times = interleaved_times({
        "PEFT LoRA, mixed": lambda: forward(lora, inputs, rows),
        "LoTR on one basis, mixed": lambda: forward(lotr, inputs, rows),
        "LoTR, one adapter": lambda: forward(lotr, inputs),
    }, repeats, warmup)
    mixed = forward(lotr, inputs, rows)
    alone = torch.empty_like(mixed)
    for name in names:  # each row with its own adapter active, the others' rows left out
        lotr.set_adapter(name)
        picked = torch.tensor([i for i, row in enumerate(rows) if row == name])
        alone[picked] = forward(lotr, {key: value[picked] for key, value in inputs.items()})
    lotr.set_adapter(names[0])
    return {
        "tasks": TASKS,
        "times": times,
        "max_abs_difference": (mixed - alone).abs().max().item(),
        "difference_from_one_adapter": (mixed - forward(lotr, inputs)).abs().max().item(),
        "output_scale": mixed.abs().max().item(),
        "memory": task_memory(setup, rank),
    }


def task_memory(setup: Setup, rank: int) -> dict:
    """Parameters that k task adapters add to the base, counted in models (each tensor once), beside the closed
    forms: LoTR on one basis ``Σ_groups r (d_in + d_out) + k Σ_groups L r²``; LoRA ``k Σ_layers r (d_in + d_out)``."""
    base = sum(p.numel() for p in setup.model.parameters())
    shapes = setup.shapes
    basis = sum(rank * sum(shapes[names[0]]) for names in group_targets(shapes, "by_name").values())
    cores = len(shapes) * rank**2
    lora = sum(rank * (d_out + d_in) for d_out, d_in in shapes.values())
    rows = [{"tasks": k,
             "lotr": sum(p.numel() for p in lotr_tasks(setup, rank, k).parameters()) - base,
             "lotr_closed_form": basis + k * cores,
             "lora": sum(p.numel() for p in peft_lora_tasks(setup, rank, k).parameters()) - base,
             "lora_closed_form": k * lora} for k in TASK_COUNTS]
    return {"basis": basis, "cores_per_task": cores, "lora_per_task": lora, "rows": rows}
