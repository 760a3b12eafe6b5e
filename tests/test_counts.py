"""Trainable-parameter counts against the closed forms in the methods' docstrings; real sharing of LoTR's factors."""

from __future__ import annotations

import torch
from torch import nn

import rankshare as rs
from conftest import METHODS, base_model


def shape_of(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.weight.shape[1], module.weight.shape[0]  # Conv1D stores (d_in, d_out)


def closed_form(config: rs.AdapterConfig, shapes: dict[str, tuple[int, int]]) -> int:
    r = config.rank
    if isinstance(config, rs.LotrConfig):
        groups: dict[tuple, int] = {}
        for name, shape in shapes.items():
            masked = ".".join("*" if part.isdigit() else part for part in name.split("."))
            key = (masked if config.share == "by_name" else None, shape)
            groups[key] = groups.get(key, 0) + 1
        factors = sum(r * (d_in + d_out) for (_, (d_out, d_in)) in groups)
        cores = sum(L * r * r for L in groups.values())
        return cores + (0 if config.freeze_factors else factors)
    N = config.num_experts
    if isinstance(config, rs.MorConfig):
        return sum(r * (d_in + d_out) + N * (r + d_out) + N * d_in for d_out, d_in in shapes.values())
    return sum(N * r * (d_in + d_out) + N * d_in for d_out, d_in in shapes.values())


def test_counts_equal_closed_forms(family, method):
    base = base_model(family)
    config = METHODS[method](family.targets)
    shapes = {name: shape_of(m) for name, m in base.named_modules() if name and name.split(".")[-1] in family.targets}
    saved = sum(p.numel() for name in family.modules_to_save for p in base.get_submodule(name).parameters())
    model = rs.adapt(base, config, modules_to_save=family.modules_to_save)
    assert model.num_trainable_parameters() == closed_form(config, shapes) + saved


def test_frozen_factors_train_cores_only(family):
    config = rs.LotrConfig(rank=3, target_modules=family.targets, freeze_factors=True)
    model = rs.adapt(base_model(family), config)
    assert model.num_trainable_parameters() == len(model.targeted_module_names) * 3 * 3
    assert all(not p.requires_grad for group in model.shared["default"].values() for p in group.parameters())


def roberta_like() -> nn.Module:
    """RoBERTa-base's query and value projections: 12 layers of two 768 × 768 linear layers."""
    layers = (nn.ModuleDict({"query": nn.Linear(768, 768), "value": nn.Linear(768, 768)}) for _ in range(12))
    return nn.Sequential(nn.ModuleList(layers))


def test_roberta_base_figures_from_methods_md():
    """RoBERTa-base q and v (d = 768, L = 12): LoRA r = 8 trains 294,912, LoTR r = 8 (by name) 26,112."""
    lotr = rs.adapt(roberta_like(), rs.LotrConfig(rank=8, target_modules=["query", "value"]))
    assert lotr.num_trainable_parameters() == 26_112
    lora = rs.adapt(roberta_like(), rs.PeftLoraConfig(rank=8, target_modules=["query", "value"]))  # PEFT's model
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == 294_912


def test_factors_are_shared_storage_and_cores_are_not(family):
    model = rs.adapt(base_model(family), rs.LotrConfig(rank=2, target_modules=family.targets))
    layers = list(model.adapter_layers().values())
    for group in model.shared["default"].values():
        members = [layer for layer in layers if layer.group is group]
        assert len(members) >= 2
        assert len({layer.group.left.data_ptr() for layer in members}) == 1
        assert len({layer.core.data_ptr() for layer in members}) == len(members)
    assert {id(layer.group) for layer in layers} == {id(g) for g in model.shared["default"].values()}


def test_by_shape_shares_across_projection_types():
    """LLaMA's k_proj and v_proj have one shape (32 → 16), so by_shape gives them one U, V."""
    from conftest import FAMILIES

    config = rs.LotrConfig(rank=2, target_modules=["k_proj", "v_proj"], share="by_shape")
    model = rs.adapt(base_model(FAMILIES["llama"]), config)
    assert list(model.shared["default"]) == ["16x32"]
    by_name = rs.adapt(base_model(FAMILIES["llama"]), rs.LotrConfig(rank=2, target_modules=["k_proj", "v_proj"]))
    assert sorted(by_name.shared["default"]) == ["model/layers/*/self_attn/k_proj", "model/layers/*/self_attn/v_proj"]


def test_by_module_gives_every_module_its_own_factors():
    """by_module: L = 1 per group, so each of LLaMA's 3 layers x (k_proj, v_proj), 16 x 32, holds
    r (d_in + d_out) + r² = 2 · 48 + 4 parameters."""
    from conftest import FAMILIES

    config = rs.LotrConfig(rank=2, target_modules=["k_proj", "v_proj"], share="by_module")
    model = rs.adapt(base_model(FAMILIES["llama"]), config)
    assert sorted(model.shared["default"]) == [f"model/layers/{i}/self_attn/{p}" for i in range(3)
                                               for p in ("k_proj", "v_proj")]
    assert model.num_trainable_parameters() == 6 * (2 * 48 + 4)


def test_print_trainable_parameters(capsys, family):
    model = rs.adapt(base_model(family), rs.MorConfig(rank=2, num_experts=2, target_modules=family.targets))
    model.print_trainable_parameters()
    assert f"trainable params: {model.num_trainable_parameters():,d}" in capsys.readouterr().out


def test_adapters_follow_the_base_device_and_stay_float32():
    base = base_model(__import__("conftest").FAMILIES["mlp"]).to(torch.bfloat16)
    model = rs.adapt(base, rs.MoeLoraConfig(rank=2, num_experts=2, target_modules=["0"]))
    assert all(t.dtype == torch.float32 for t in model.adapter_state_dict().values())
