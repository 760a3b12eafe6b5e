"""What the benchmark runs: models with inputs, and the training variants built over one copy of their weights."""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass, field

import torch
from torch import nn

import rankshare as rs

from ..finetune.budget import closest_rank
from ..finetune.models import load_causal_lm, load_classifier, load_tokenizer, resolve_model
from ..targets import target_shapes

NUM_LABELS = 4


@dataclass
class Setup:
    """A model to benchmark: a sequence classifier (or a causal LM with its tokenizer), its adapter targets and
    one batch (``batch`` rows of ``length`` tokens; for a causal LM, ``batch`` examples of at most ``length``)."""

    name: str
    model: nn.Module
    targets: list[str]
    batch: int
    length: int
    description: str
    tokenizer: object | None = None

    def inputs(self, seed: int = 0) -> dict:
        generator = torch.Generator().manual_seed(seed)
        vocab = self.model.config.vocab_size
        ids = torch.randint(3, vocab, (self.batch, self.length), generator=generator)
        labels = torch.randint(0, NUM_LABELS, (self.batch,), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return target_shapes(self.model, self.targets)


def packaged_setup(name: str, batch: int, length: int) -> Setup:
    torch.manual_seed(0)
    model = load_classifier(resolve_model(name), NUM_LABELS).eval().requires_grad_(False)
    targets = ["query", "value"] if name == "minilm" else ["q_proj", "v_proj"]
    layers = model.config.num_hidden_layers
    return Setup(name, model, targets, batch, length, f"{name}: {layers} layers, d = {model.config.hidden_size}")


def causal_setup(spec: str, batch: int, length: int) -> Setup:
    """A causal LM with its tokenizer (``smollm2``, or a model folder), adapted on q and v, for instruction tuning."""
    torch.manual_seed(0)
    source = resolve_model(spec)
    model = load_causal_lm(source).eval().requires_grad_(False)
    name = spec if spec in ("minilm", "smollm2") else model.config.model_type
    layers = model.config.num_hidden_layers
    return Setup(name, model, ["q_proj", "v_proj"], batch, length,
                 f"{name} (causal LM): {layers} layers, d = {model.config.hidden_size}", load_tokenizer(source))


def synthetic_setup(hidden: int, layers: int, batch: int, length: int) -> Setup:
    """A LLaMA-shaped classifier with random weights, to show how costs grow with d and L."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, intermediate_size=256 * round(2.6875 * hidden / 256),
                         vocab_size=2048, max_position_embeddings=length, num_labels=NUM_LABELS, pad_token_id=0)
    model = LlamaForSequenceClassification(config).eval().requires_grad_(False)
    return Setup(f"llama-d{hidden}-L{layers}", model, ["q_proj", "v_proj"], batch, length,
                 f"random LLaMA: {layers} layers, d = {hidden}")


@dataclass
class Variant:
    """One way to train the model; every variant shares the frozen weights of one base model."""

    name: str
    model: nn.Module
    trainable: list[nn.Parameter] = field(default_factory=list)
    optimiser: torch.optim.Optimizer | None = None
    adapter_parameters: int = 0

    def finish(self) -> Variant:
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.trainable:
            self.optimiser = torch.optim.AdamW(self.trainable, lr=1e-4)
        return self


def weight_sharing_copy(model: nn.Module) -> nn.Module:
    """A copy with its own modules but the same parameter and buffer tensors (nothing is duplicated)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def the_limit(setup: Setup) -> Variant:
    """The frozen base with gradients flowing back through every layer to the input embeddings.

    No weight has a gradient: this is the least backward work that any adapter in the first layer needs.
    """
    model = weight_sharing_copy(setup.model)
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.requires_grad_())
    return Variant("limit (frozen, grads to inputs)", model).finish()


def head_only(setup: Setup) -> Variant:
    model = weight_sharing_copy(setup.model)
    name = "classifier" if hasattr(model, "classifier") else "score"
    setattr(model, name, copy.deepcopy(getattr(model, name)).requires_grad_(True))  # its own, trainable head
    return Variant("head only", model).finish()


def peft_lora(setup: Setup, rank: int, task_type: str | None = None) -> Variant:
    """``task_type``: PEFT's wrapper (``"CAUSAL_LM"`` for a causal LM, whose ``generate`` PEFT prepares)."""
    import peft

    torch.manual_seed(1)
    config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=setup.targets,
                             task_type=task_type)
    model = peft.get_peft_model(weight_sharing_copy(setup.model), config)
    return Variant(f"PEFT LoRA r={rank}", model, adapter_parameters=_trainable(model)).finish()


def ours(setup: Setup, config: rs.AdapterConfig, name: str) -> Variant:
    torch.manual_seed(1)
    model = rs.adapt(weight_sharing_copy(setup.model), config)
    return Variant(name, model, adapter_parameters=model.num_trainable_parameters()).finish()


def task_names(count: int) -> list[str]:
    return [f"task{i}" for i in range(count)]


def lotr_tasks(setup: Setup, rank: int, count: int) -> rs.AdaptedModel:
    """``count`` LoTR adapters on one basis: task0 owns U and V, every other task only its cores (on task0's U, V)."""
    torch.manual_seed(1)
    first, *others = task_names(count)
    model = rs.adapt(weight_sharing_copy(setup.model), rs.LotrConfig(rank=rank, target_modules=setup.targets),
                     adapter_name=first)
    for name in others:
        model.add_adapter(name, rs.LotrConfig(rank=rank, target_modules=setup.targets, basis=first))
    return model


def peft_lora_tasks(setup: Setup, rank: int, count: int) -> nn.Module:
    """``count`` PEFT LoRA adapters (one per task) on one copy of the base."""
    import peft

    torch.manual_seed(1)
    first, *others = task_names(count)

    def config():
        return peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=setup.targets)

    model = peft.get_peft_model(weight_sharing_copy(setup.model), config(), adapter_name=first)
    for name in others:
        model.add_adapter(name, config())
    return model


def cores_on_a_basis(setup: Setup, rank: int) -> Variant:
    """A second task on the first task's LoTR basis: only its cores (L r² per group) train."""
    model = lotr_tasks(setup, rank, 2)
    model.set_adapter(task_names(2)[1])
    return Variant(f"LoTR cores only (r={rank}, on a basis)", model,
                   adapter_parameters=model.num_trainable_parameters()).finish()


def naive_mor(setup: Setup, rank: int, num_experts: int) -> Variant:
    """MoR computed expert by expert, materialising (n, N, d_out): what the fast path avoids."""
    variant = ours(setup, rs.MorConfig(rank=rank, num_experts=num_experts, target_modules=setup.targets),
                   f"MoR N={num_experts} r={rank}, naive per-expert")
    for layer in variant.model.adapter_layers().values():
        layer.adapter_forward = types.MethodType(_per_expert_forward, layer)
    return variant


def _per_expert_forward(layer: rs.MorLayer, x: torch.Tensor) -> torch.Tensor:
    gates = layer.router_probs(x)  # (..., N)
    hidden = x @ layer.lora_A.T  # (..., r)
    per_expert = ((hidden.unsqueeze(-2) * layer.scale_in) @ layer.lora_B.T) * layer.scale_out  # (..., N, d_out)
    return layer.scale * (gates.unsqueeze(-1) * per_expert).sum(-2)


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_variants(setup: Setup, rank: int, num_experts: int, full: bool) -> list[Variant]:
    """The limit, head-only, PEFT LoRA, LoTR (same rank, its cores alone on a basis, and at LoRA's budget), MoR,
    MoE-LoRA, naive MoR."""
    lora = peft_lora(setup, rank)
    matched, _ = closest_rank(rs.LotrConfig(target_modules=setup.targets), setup.shapes, lora.adapter_parameters)
    variants = [
        the_limit(setup),
        lora,
        ours(setup, rs.LotrConfig(rank=rank, target_modules=setup.targets), f"LoTR r={rank}"),
        cores_on_a_basis(setup, rank),
        ours(setup, rs.MorConfig(rank=rank, num_experts=num_experts, target_modules=setup.targets),
             f"MoR N={num_experts} r={rank}"),
    ]
    if full:
        variants[1:1] = [head_only(setup)]
        variants += [
            ours(setup, rs.LotrConfig(rank=matched, target_modules=setup.targets), f"LoTR r={matched} (LoRA's budget)"),
            ours(setup, rs.MoeLoraConfig(rank=rank, num_experts=num_experts, target_modules=setup.targets),
                 f"MoE-LoRA N={num_experts} r={rank}"),
            naive_mor(setup, rank, num_experts),
        ]
    return variants
