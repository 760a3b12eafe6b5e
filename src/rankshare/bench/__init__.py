"""``rankshare bench``: what LoTR, MoR and MoE-LoRA cost next to PEFT's LoRA and the frozen base, in one run.

Every variant of a model shares that model's frozen weights and is measured in the same process, round
after round in rotating order, so that ratios between variants are fair even on a busy machine.

Sections: ``models`` (each model's training variants, forward, memory, files, merged inference, many tasks),
``sft`` (instruction tuning on a causal LM: the SFT step on a skills batch and greedy generation speed; see
``sft.py``) and ``serving`` (k LoRAs compressed into one basis, served in one mixed batch; see ``serving.py``).
The quick bench runs ``models`` on MiniLM alone (an encoder: nothing to generate); the full bench runs all three,
``sft`` and ``serving`` on SmolLM2.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from ..atomic_files import replace_file
from ..errors import RankshareError
from ..finetune.progress import progress
from ..finetune.train import versions
from ..lotr import LotrConfig
from ..peft_lora import PeftLoraConfig
from .measure import (
    TASKS,
    adapter_file,
    forward,
    interleaved_times,
    merged_inference,
    mixed_batch,
    train_step,
    training_memory,
)
from .report import write_bench_report
from .serving import serving
from .setups import Setup, build_variants, causal_setup, packaged_setup, synthetic_setup
from .sft import NEW_TOKENS, instruction_tuning

RANK, NUM_EXPERTS = 8, 8
SECTIONS = ("models", "sft", "serving")
# Serving: the rank and groups of the k compressed LoRAs' basis: the fewest parameters that kept 95 % of the eight
# skills LoRAs' average exact match (compress-smollm2-skills: a basis per module at rank 8, 0.13x their parameters;
# a basis per projection across layers kept 60 % at rank 64, 0.57x their parameters).
SERVING_RANK, SERVING_SHARE = 8, "by_module"
SFT_EXAMPLES, SFT_LENGTH = 8, 128  # one skills example per task, prompt + response within 128 tokens


def setups(full: bool):
    """Models in the order they are measured (built one at a time, so only one is in memory)."""
    yield lambda: packaged_setup("minilm", batch=32, length=64)
    if full:
        yield lambda: packaged_setup("smollm2", batch=8, length=64)
        for hidden, layers in ((1024, 12), (1024, 24), (2048, 12)):
            yield lambda hidden=hidden, layers=layers: synthetic_setup(hidden, layers, batch=2, length=64)


def bench_setup(setup: Setup, repeats: int, warmup: int, full: bool, say) -> dict:
    variants = build_variants(setup, RANK, NUM_EXPERTS, full)
    inputs = setup.inputs()
    say(f"{setup.description}: {len(variants)} variants, batch {setup.batch} × {setup.length} tokens")
    step = interleaved_times({v.name: (lambda v=v: train_step(v, inputs)) for v in variants}, repeats, warmup)
    for variant in variants:
        variant.model.eval()
    fwd = interleaved_times({v.name: (lambda v=v: forward(v.model, inputs)) for v in variants}, repeats, warmup)
    for variant in variants:
        variant.model.train()
    records = []
    for variant in variants:
        records.append({
            "name": variant.name,
            "adapter_parameters": variant.adapter_parameters,
            "trainable_parameters": sum(p.numel() for p in variant.trainable),
            "step": step[variant.name],
            "forward": fwd[variant.name],
            "memory": training_memory(variant, inputs),
            "file": adapter_file(variant),
        })
    result = {"name": setup.name, "description": setup.description, "batch": setup.batch, "length": setup.length,
              "rank": RANK, "num_experts": NUM_EXPERTS, "variants": records}
    if sum(p.numel() for p in setup.model.parameters()) < 500_000_000:
        by_name = {v.name: v for v in variants}
        # Three models that differ only in their weights' values: a ratio near 1 needs more rounds to resolve.
        lotr, mor = by_name[f"LoTR r={RANK}"], by_name[f"MoR N={NUM_EXPERTS} r={RANK}"]
        result["merged_inference"] = merged_inference(setup, lotr, mor, inputs, 3 * repeats, warmup)
    if setup.batch >= TASKS:  # a batch with a row for every task
        result["many_tasks"] = mixed_batch(setup, RANK, inputs, repeats, warmup)
    return result


def parameter_scaling() -> list[dict]:
    """Trainable parameters of LoRA and LoTR (r = 8, q and v, one U, V per projection) as d and L grow."""
    rows = []
    for hidden in (384, 768, 1024, 2048, 4096):
        for layers in (6, 12, 24, 32, 48):
            shapes = {f"layers.{i}.{p}": (hidden, hidden) for i in range(layers) for p in ("q_proj", "v_proj")}
            lora = PeftLoraConfig(rank=RANK, target_modules=["q_proj", "v_proj"]).num_trainable_parameters(shapes)
            lotr = LotrConfig(rank=RANK, target_modules=["q_proj", "v_proj"]).num_trainable_parameters(shapes)
            rows.append({"d": hidden, "L": layers, "lora": lora, "lotr": lotr, "lotr_over_lora": lotr / lora})
    return rows


def run_bench(out: Path, full: bool, repeats: int, warmup: int = 2, say=print, quiet: bool = False,
              sections: tuple[str, ...] | None = None, sft_model: str = "smollm2", sft_options: dict | None = None
              ) -> dict:
    """Measure ``sections`` (default: ``models`` and, with ``full``, ``sft``) and write bench.json, bench.md and
    plots to ``out``. ``full`` chooses the models of ``models``; ``sft`` runs on ``sft_model`` (a causal LM), with
    ``sft_options`` for ``sft_section`` (``examples``, ``length``, ``new_tokens``)."""
    sections = tuple(sections) if sections else SECTIONS if full else ("models",)
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        raise RankshareError(f"Unknown bench section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}.")
    started = time.perf_counter()
    results = []
    makers = list(setups(full)) if "models" in sections else []
    with progress(len(makers) + ("sft" in sections) + ("serving" in sections), "bench", "models", quiet) as bar:
        for make in makers:
            setup = make()
            results.append(bench_setup(setup, repeats, warmup, full, say))
            del setup
            bar.update()
        if "sft" in sections:
            sft = sft_section(sft_model, repeats, warmup, say, **(sft_options or {}))
            bar.update()
        if "serving" in sections:
            options = {key: value for key, value in (sft_options or {}).items() if key == "new_tokens"}
            served = serving(causal_setup(sft_model, batch=SFT_EXAMPLES, length=SFT_LENGTH), SERVING_RANK, repeats,
                             warmup, say=say, share=SERVING_SHARE, **options)
            bar.update()
    bench = {
        "mode": "full" if full else "quick",
        "sections": list(sections),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": "cpu", "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": versions(),
        "repeats": repeats,
        "warmup": warmup,
        "setups": results,
    }
    if "models" in sections:
        bench["parameter_scaling"] = parameter_scaling()
    if "sft" in sections:
        bench["instruction_tuning"] = sft
    if "serving" in sections:
        bench["serving"] = served
    bench["wall_seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    replace_file(out / "bench.json", (json.dumps(bench, indent=2) + "\n").encode("utf-8"))
    write_bench_report(out, bench)
    return bench


def sft_section(model: str, repeats: int, warmup: int, say=print, examples: int = SFT_EXAMPLES,
                length: int = SFT_LENGTH, new_tokens: int = NEW_TOKENS) -> dict:
    """The instruction-tuning record of the causal LM ``model`` (``smollm2`` or a model folder)."""
    setup = causal_setup(model, batch=examples, length=length)
    return instruction_tuning(setup, RANK, NUM_EXPERTS, repeats, warmup, new_tokens, say)


def run_sft_bench(out: Path, repeats: int, warmup: int = 2, say=print, quiet: bool = False,
                  model: str = "smollm2", **options) -> dict:
    """The instruction-tuning section alone (``rankshare bench --only sft``); ``options`` as for ``sft_section``."""
    return run_bench(out, True, repeats, warmup, say, quiet, sections=("sft",), sft_model=model, sft_options=options)
