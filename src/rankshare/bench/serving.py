"""Serving k tasks from one base: LoRAs compressed into one shared LoTR basis against the k LoRAs themselves.

One prompt batch of the skills set, one row per task (k = 8), each row answered by its own task's adapter with
greedy generation of ``new_tokens`` tokens (KV cache on, end tokens held back until then):

- (a) the k LoRAs compressed jointly (``rs.compress_loras``, rank ``rank``, groups ``share``), in rankshare's mixed
  batch;
- (b) the k PEFT LoRAs (r = 8 on q and v) in PEFT's own mixed batch (``adapter_names``);
- (c) one LoRA merged into the weights: the ceiling for any adapter;
- (d) the base model.

Each LoRA's B is set at random (the A PEFT draws), its update a fixed share of its layer's weight, so that every
task generates its own tokens. Throughput does not depend on the values; the compression error does, and is
measured on real adapters elsewhere (the README's skills table). The memory the adapters hold is their tensors'
bytes, the basis counted once.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

import rankshare as rs

from .measure import interleaved_times
from .setups import Setup, Variant, task_names, weight_sharing_copy
from .sft import NEW_TOKENS, generate_tokens, randomise_updates, skills_batch

LORA_RANK = 8


def serving(setup: Setup, rank: int, repeats: int, warmup: int, new_tokens: int = NEW_TOKENS, say=print,
            share: str = "by_name") -> dict:
    import peft

    objective, examples = skills_batch(setup)  # one example of each task, in turn
    prompts = objective.prompt_batch([e.context for e in examples], "cpu")
    tasks = task_names(len(set(e.task for e in examples)))
    rows = [tasks[i % len(tasks)] for i in range(len(examples))]
    torch.manual_seed(1)
    loras = peft.get_peft_model(weight_sharing_copy(setup.model), _lora_config(setup), adapter_name=tasks[0])
    for name in tasks[1:]:
        loras.add_adapter(name, _lora_config(setup))
    randomise_updates(Variant("LoRAs", loras))  # every adapter's B, each its own draw
    with tempfile.TemporaryDirectory() as folder:
        loras.save_pretrained(folder)  # each adapter in folder/<name>
        compressed, report = rs.compress_loras(weight_sharing_copy(setup.model),
                                               {task: Path(folder) / task for task in tasks}, rank, share)
        # Merging writes into the weights: the ceiling gets a copy of its own.
        merged = peft.PeftModel.from_pretrained(copy.deepcopy(setup.model), Path(folder) / tasks[0])
        merged = merged.merge_and_unload().eval()
    compressed.eval()
    models = {
        "(a) compressed, rankshare mixed batch": lambda: generate_tokens(compressed, prompts, setup.tokenizer,
                                                                          new_tokens, adapter_names=rows),
        "(b) PEFT LoRAs, PEFT mixed batch": lambda: generate_tokens(loras.eval(), prompts, setup.tokenizer,
                                                                     new_tokens, adapter_names=rows),
        "(c) one merged LoRA": lambda: generate_tokens(merged, prompts, setup.tokenizer, new_tokens),
        "(d) base model": lambda: generate_tokens(setup.model.eval(), prompts, setup.tokenizer, new_tokens),
    }
    say(f"{setup.description}: {len(tasks)} tasks in one batch, greedy generation of {new_tokens} tokens, "
        f"{len(models)} ways")
    times = interleaved_times(models, repeats, warmup)
    tokens = len(examples) * new_tokens
    speed = {name: tokens / time["median"] for name, time in times.items()}
    memory = {"(a)": _bytes(compressed.parameters(), setup.model), "(b)": _bytes(loras.parameters(), setup.model)}
    (a, b, c, d) = (speed[name] for name in models)
    return {
        "name": setup.name, "description": setup.description, "tasks": len(tasks), "lora_rank": LORA_RANK,
        "rank": rank, "share": share, "new_tokens": new_tokens, "prompts": len(examples),
        "times": times, "tokens_per_second": speed,
        "adapter_bytes": memory,
        "parameters": {"compressed": report.total_parameters, "loras": sum(report.lora_parameters.values())},
        "ratios": {"a_over_b": a / b, "a_over_d": a / d, "c_over_d": c / d,
                   "memory_a_over_b": memory["(a)"] / memory["(b)"]},
    }


def _lora_config(setup: Setup):
    import peft

    return peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, target_modules=setup.targets)


def _bytes(parameters, base) -> int:
    """Bytes of the tensors in ``parameters`` that are not the base model's (each tensor once)."""
    shared = {p.data_ptr() for p in base.parameters()}
    seen = {p.data_ptr(): p for p in parameters if p.data_ptr() not in shared}
    return sum(p.numel() * p.element_size() for p in seen.values())
