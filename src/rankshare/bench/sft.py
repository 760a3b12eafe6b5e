"""Instruction tuning on a causal LM: an SFT training step on a skills batch, and greedy generation speed.

The batch is one training example of each skills task (seed 0), built by ``InstructionTuning``: prompt then
response, the loss on the response's tokens alone. PEFT's LoRA, LoTR and MoR (rank 8 on q and v) take
interleaved training steps on it. Then the frozen base, merged LoTR and the unmerged LoTR, MoR and PEFT LoRA
generate greedily from the batch's prompts (left padded, KV cache on), in interleaved rounds, exactly
``new_tokens`` tokens each (the end of turn is held back until then), so that tokens per second compare like
with like.

Every adapter's zero-initialised factor (LoRA's and MoR's B, LoTR's cores) is first set at random, each layer's
update a fixed fraction of its frozen weight's norm: the adapters then change what is generated, and the check
that merged LoTR generates the unmerged LoTR's tokens is not made where both are the base.
"""

from __future__ import annotations

from functools import partial

import torch

import rankshare as rs

from ..finetune.data import Instruction, load_data
from ..finetune.objectives import IGNORE, InstructionTuning, end_token_ids
from ..layer import dense_weight
from .measure import interleaved_times, lm_loss, merged_copy, train_step
from .setups import Setup, Variant, ours, peft_lora

NEW_TOKENS = 32  # generated per prompt
RELATIVE_UPDATE = 0.05  # ‖ΔW‖_F / ‖W‖_F of every adapted layer once its adapter is set at random
MERGED, BASE = "LoTR r={rank} merged", "base"


def skills_batch(setup: Setup, seed: int = 0) -> tuple[InstructionTuning, list[Instruction]]:
    """The objective (``setup.length`` tokens at most) and ``setup.batch`` training examples of the skills set,
    the tasks taken in turn (one example of each task for a batch of 8)."""
    splits = load_data("skills", seed=seed, max_train=setup.batch, max_eval=1)
    objective = InstructionTuning(setup.tokenizer, splits.tasks, max_length=setup.length)
    by_task = {task: [e for e in splits.train if e.task == task and objective.encode_pair(e)] for task in splits.tasks}
    tasks = list(splits.tasks)
    return objective, [by_task[tasks[i % len(tasks)]][i // len(tasks)] for i in range(setup.batch)]


@torch.no_grad()
def generate_tokens(model, prompts: dict, tokenizer, new_tokens: int, **options) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens per prompt (B, new_tokens), KV cache on: every token that
    could end the answer is held back until then. ``options`` go to ``generate`` (e.g. ``adapter_names``)."""
    output = model.generate(**prompts, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            use_cache=True, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=end_token_ids(tokenizer, model), **options)
    return output[:, prompts["input_ids"].shape[1]:]


def adapter_updates(model):
    """(zero-initialised factor, the layer's ΔW as a function of nothing, the frozen W) per adapted layer."""
    if isinstance(model, rs.AdaptedModel):
        for layer in model.adapter_layers().values():
            if isinstance(layer, rs.LotrLayer):
                yield layer.core, layer.delta_weight, dense_weight(layer.base_layer)
            else:  # MoR: its update at constant gates 1/N
                gates = torch.full((layer.num_experts,), 1 / layer.num_experts)
                yield layer.lora_B, partial(layer.delta_weight, gates), dense_weight(layer.base_layer)
        return
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_B:
                yield (module.lora_B[name].weight, partial(module.get_delta_weight, name),
                       module.get_base_layer().weight)


@torch.no_grad()
def randomise_updates(variant: Variant, relative: float = RELATIVE_UPDATE, seed: int = 3) -> None:
    """Each layer's zero-initialised factor set at random, scaled so that ‖ΔW‖_F = ``relative`` · ‖W‖_F."""
    generator = torch.Generator().manual_seed(seed)
    for factor, update, weight in adapter_updates(variant.model):
        factor.copy_(torch.randn(factor.shape, generator=generator))
        factor.mul_(relative * weight.float().norm() / update().float().norm())


def instruction_tuning(setup: Setup, rank: int, num_experts: int, repeats: int, warmup: int,
                       new_tokens: int = NEW_TOKENS, say=print) -> dict:
    """The SFT step of PEFT LoRA, LoTR and MoR, and generation tokens per second of the base, merged LoTR and
    the unmerged adapters; with the check that merged LoTR generates the unmerged LoTR's tokens."""
    objective, examples = skills_batch(setup)
    inputs = objective.batch(examples, "cpu").inputs
    prompts = objective.prompt_batch([e.context for e in examples], "cpu")
    variants = [peft_lora(setup, rank, task_type="CAUSAL_LM"),
                ours(setup, rs.LotrConfig(rank=rank, target_modules=setup.targets), f"LoTR r={rank}"),
                ours(setup, rs.MorConfig(rank=rank, num_experts=num_experts, target_modules=setup.targets),
                     f"MoR N={num_experts} r={rank}")]
    lora, lotr, mor = variants
    for variant in variants:
        randomise_updates(variant)
    say(f"{setup.description}: SFT step of {len(variants)} variants on {len(examples)} skills examples, "
        f"{tuple(inputs['input_ids'].shape)} tokens")
    step = interleaved_times({v.name: (lambda v=v: train_step(v, inputs, loss=lm_loss)) for v in variants},
                             repeats, warmup)

    for variant in variants:
        variant.model.eval()
    merged = merged_copy(lotr, gates=None)
    models = {BASE: setup.model.eval(), MERGED.format(rank=rank): merged, lotr.name: lotr.model, mor.name: mor.model,
              lora.name: lora.model}
    say(f"{setup.description}: greedy generation of {new_tokens} tokens from {len(examples)} prompts, "
        f"{len(models)} models")
    tokens: dict[str, torch.Tensor] = {}

    def generate(name: str) -> None:
        tokens[name] = generate_tokens(models[name], prompts, setup.tokenizer, new_tokens)

    # Models that differ only in small updates: a ratio near 1 needs more rounds to resolve.
    times = interleaved_times({name: partial(generate, name) for name in models}, 2 * repeats, warmup)
    for variant in variants:
        variant.model.train()

    generated = []
    for name, time in times.items():
        count = tokens[name].numel()
        generated.append({"name": name, "time": time, "generated_tokens": count,
                          "tokens_per_second": count / time["median"],
                          "differs_from_base": (tokens[name] != tokens[BASE]).float().mean().item()})
    speed = {row["name"]: row["tokens_per_second"] for row in generated}
    agreement = (tokens[MERGED.format(rank=rank)] == tokens[lotr.name]).float().mean().item()
    return {
        "name": setup.name, "description": setup.description, "rank": rank, "num_experts": num_experts,
        "targets": setup.targets, "layout": "chat" if objective.chat else "plain",
        "relative_update": RELATIVE_UPDATE,
        "batch": {"examples": len(examples), "tasks": [e.task for e in examples], "max_length": setup.length,
                  "shape": list(inputs["input_ids"].shape),
                  "response_tokens": int((inputs["labels"] != IGNORE).sum()),
                  "prompt_width": prompts["input_ids"].shape[1]},
        "sft_step": [{"name": v.name, "adapter_parameters": v.adapter_parameters, "step": step[v.name]}
                     for v in variants],
        "generation": {"new_tokens": new_tokens, "variants": generated,
                       "merged_lotr": {"tokens_equal": agreement == 1.0, "token_agreement": agreement}},
        "ratios": {
            "step_lotr_over_lora": step[lotr.name]["median"] / step[lora.name]["median"],
            "step_mor_over_lora": step[mor.name]["median"] / step[lora.name]["median"],
            "generation_merged_lotr_over_base": speed[MERGED.format(rank=rank)] / speed[BASE],
            "generation_lotr_over_lora": speed[lotr.name] / speed[lora.name],
            "generation_mor_over_lora": speed[mor.name] / speed[lora.name],
        },
    }
