"""The fast forward paths against dense reference formulas written out here, independently of the library."""

from __future__ import annotations

import pytest
import torch

import rankshare as rs
from conftest import FAMILIES, METHODS, base_model, randomise_adapters, run


def dense_base_weight(layer: rs.AdapterLayer) -> torch.Tensor:
    """(d_out, d_in), whatever the base layer's storage: nn.Linear is (d_out, d_in), Conv1D (d_in, d_out)."""
    weight = layer.base_layer.weight
    return weight if isinstance(layer.base_layer, torch.nn.Linear) else weight.T


def reference_expert_updates(layer: rs.AdapterLayer) -> torch.Tensor:
    """s · ΔW_i as (N, d_out, d_in), from the raw parameters, following the papers (as in mor.py and moelora.py)."""
    s = layer.scale
    if isinstance(layer, rs.MorLayer):
        A, B, a, b = layer.lora_A, layer.lora_B, layer.scale_in, layer.scale_out
        return torch.stack([s * torch.diag(b[i]) @ B @ torch.diag(a[i]) @ A for i in range(len(a))])
    return torch.stack([s * layer.lora_B[i] @ layer.lora_A[i] for i in range(layer.num_experts)])


def reference_output(layer: rs.AdapterLayer, x: torch.Tensor) -> torch.Tensor:
    """y = W x + b + update, token by token, with every ΔW formed densely."""
    W = dense_base_weight(layer)
    y = x @ W.T
    if layer.base_layer.bias is not None:
        y = y + layer.base_layer.bias
    if isinstance(layer, rs.LotrLayer):
        U, G, V = layer.group.left, layer.core, layer.group.right
        return y + x @ (layer.scale * U @ G @ V.T).T
    gates = torch.softmax(x @ layer.router.T, dim=-1)  # (..., N)
    updates = reference_expert_updates(layer)  # (N, d_out, d_in)
    per_expert = torch.stack([x @ updates[i].T for i in range(len(updates))], dim=-2)  # (..., N, d_out)
    return y + (gates.unsqueeze(-1) * per_expert).sum(-2)


def test_identity_at_init(family, method):
    base = base_model(family)
    expected = run(base, family.inputs())
    model = rs.adapt(base, METHODS[method](family.targets))
    torch.testing.assert_close(run(model, family.inputs()), expected, rtol=0, atol=0)


@torch.no_grad()
def test_fast_path_equals_dense_reference(adapted, family):
    randomise_adapters(adapted)
    generator = torch.Generator().manual_seed(3)
    for name, layer in adapted.adapter_layers().items():
        x = torch.randn(2, 5, layer.in_features, generator=generator)
        torch.testing.assert_close(layer(x), reference_output(layer, x), rtol=1e-5, atol=1e-5, msg=name)


@torch.no_grad()
def test_whole_model_lotr_equals_model_with_dense_updates(family):
    """A LoTR model gives the outputs of the base model with W_l + s U G_l Vᵀ written into each weight."""
    model = rs.adapt(base_model(family), METHODS["lotr"](family.targets))
    randomise_adapters(model)
    reference = base_model(family)
    for name, layer in model.adapter_layers().items():
        dense = layer.scale * layer.group.left @ layer.core @ layer.group.right.T
        target = reference.get_submodule(name)
        target.weight += dense if isinstance(target, torch.nn.Linear) else dense.T
    torch.testing.assert_close(run(model, family.inputs()), run(reference, family.inputs()), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_mixture_introspection(family):
    """layer(x) == base_layer(x) + Σ_i g_i(x) ΔW_i x with router_probs and expert_delta_weights."""
    for method in ("mor", "moelora"):
        model = rs.adapt(base_model(family), METHODS[method](family.targets))
        randomise_adapters(model)
        for layer in model.adapter_layers().values():
            x = torch.randn(3, 4, layer.in_features)
            gates, updates = layer.router_probs(x), layer.expert_delta_weights()
            assert gates.shape == (3, 4, layer.num_experts)
            torch.testing.assert_close(gates.sum(-1), torch.ones(3, 4))
            assert updates.shape == (layer.num_experts, layer.out_features, layer.in_features)
            torch.testing.assert_close(updates, reference_expert_updates(layer))
            mixed = torch.einsum("tni,iod,tnd->tno", gates, updates, x)
            torch.testing.assert_close(layer(x), layer.base_layer(x) + mixed, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_lotr_delta_weight_is_d_out_by_d_in_for_conv1d():
    model = rs.adapt(base_model(FAMILIES["gpt2"]), rs.LotrConfig(rank=2, target_modules=["c_attn"]))
    randomise_adapters(model)
    layer = model.adapter_layers()["transformer.h.0.attn.c_attn"]
    assert layer.delta_weight().shape == (96, 32)
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ layer.delta_weight().T, rtol=1e-5, atol=1e-5)


def test_mor_with_unit_scales_is_lora():
    """With a_i = b_i = 1 the gates sum out: MoR at init is the LoRA s · B A (whatever B is)."""
    model = rs.adapt(base_model(FAMILIES["mlp"]), rs.MorConfig(rank=3, num_experts=4, target_modules=["2"]))
    layer = model.adapter_layers()["2"]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.scale * x @ layer.lora_A.T @ layer.lora_B.T)


@pytest.mark.parametrize("share", ["by_name", "by_shape"])
def test_tucker_init_spans_leading_singular_subspaces(share):
    family = FAMILIES["llama"]
    config = rs.LotrConfig(rank=3, target_modules=["q_proj", "o_proj"], init="tucker", share=share)
    model = rs.adapt(base_model(family), config)
    for key, group in model.shared["default"].items():
        layers = [layer for layer in model.adapter_layers().values() if layer.group is group]
        W = torch.stack([dense_base_weight(layer).double() for layer in layers])  # (L, d_out, d_in)
        mode1 = torch.cat(list(W), dim=1)  # (d_out, L d_in) = [W_1 … W_L]
        mode3 = torch.cat([w.T for w in W], dim=1)  # (d_in, L d_out) = [W_1ᵀ … W_Lᵀ]
        for factor, unfolding in ((group.left, mode1), (group.right, mode3)):
            leading = torch.linalg.svd(unfolding, full_matrices=False).U[:, :3]
            factor = factor.double()
            torch.testing.assert_close(factor.T @ factor, torch.eye(3, dtype=torch.double), atol=1e-5, rtol=0)
            torch.testing.assert_close(factor @ factor.T, leading @ leading.T, atol=1e-4, rtol=0, msg=key)
        assert all((layer.core == 0).all() for layer in layers)


def test_lotr_random_factors_are_orthonormal_and_updates_start_at_zero():
    model = rs.adapt(base_model(FAMILIES["bert"]), rs.LotrConfig(rank=4, target_modules=["query"]))
    for group in model.shared["default"].values():
        for factor in (group.left, group.right):
            torch.testing.assert_close(factor.T @ factor, torch.eye(4), atol=1e-5, rtol=0)
    for layer in model.adapter_layers().values():
        assert (layer.delta_weight() == 0).all()


def test_mor_experts_diverge_during_training():
    """A random router breaks the symmetry: experts' scaling vectors differ after a few steps."""
    family = FAMILIES["bert"]
    model = rs.adapt(base_model(family), rs.MorConfig(rank=4, num_experts=4, target_modules=["query", "value"]))
    layer = model.adapter_layers()["bert.encoder.layer.0.attention.self.query"]
    assert (layer.scale_out == 1).all() and (layer.scale_in == 1).all()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 2])
    for _ in range(4):
        loss = model(**family.inputs(), labels=labels).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    for scales in (layer.scale_out, layer.scale_in):
        for i in range(4):
            for j in range(i):
                assert (scales[i] - scales[j]).abs().max() > 1e-4, (i, j)


@torch.no_grad()
def test_mixture_merged_update_is_the_gated_sum_of_expert_updates(family):
    """delta_weight(g) = Σ_i g_i · s ΔW_i for any constant gates (computed without forming every ΔW_i)."""
    for method in ("mor", "moelora"):
        model = rs.adapt(base_model(family), METHODS[method](family.targets))
        randomise_adapters(model)
        gates = torch.tensor([0.7, -0.2, 1.5])
        for layer in model.adapter_layers().values():
            expected = torch.einsum("i,iod->od", gates, reference_expert_updates(layer))
            torch.testing.assert_close(layer.delta_weight(gates), expected, rtol=1e-5, atol=1e-6)
