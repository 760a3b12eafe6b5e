"""Merging folds s·ΔW into W exactly: merged outputs equal unmerged ones, and unmerge restores W."""

from __future__ import annotations

import warnings

import pytest
import torch

import rankshare as rs
from conftest import METHODS, base_model, randomise_adapters, run


@torch.no_grad()
@pytest.mark.parametrize("method", ["lotr", "lotr_by_shape"])
def test_lotr_merge_unmerge_and_unload(family, method):
    model = rs.adapt(base_model(family), METHODS[method](family.targets))
    randomise_adapters(model)
    inputs = family.inputs()
    expected = run(model, inputs)
    original = {name: layer.base_layer.weight.clone() for name, layer in model.adapter_layers().items()}

    model.merge()
    for name, layer in model.adapter_layers().items():
        weight = layer.base_layer.weight
        dense = weight if isinstance(layer.base_layer, torch.nn.Linear) else weight.T
        original_dense = original[name] if isinstance(layer.base_layer, torch.nn.Linear) else original[name].T
        torch.testing.assert_close(dense, original_dense + layer.delta_weight(), rtol=0, atol=1e-6)  # W ← W + ΔW
    torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=1e-5)

    merged_weights = {name: layer.base_layer.weight.clone() for name, layer in model.adapter_layers().items()}
    with pytest.warns(UserWarning, match="already merged"):
        model.merge()
    for name, layer in model.adapter_layers().items():
        assert torch.equal(layer.base_layer.weight, merged_weights[name])

    model.unmerge()
    for name, layer in model.adapter_layers().items():
        torch.testing.assert_close(layer.base_layer.weight, original[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=1e-5)

    plain = model.merge_and_unload()
    assert type(plain) is type(base_model(family))
    assert not any(isinstance(m, rs.AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(run(plain, inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["mor", "moelora"])
def test_mixture_refuses_to_merge_without_gates(family, method):
    model = rs.adapt(base_model(family), METHODS[method](family.targets))
    with pytest.raises(rs.RankshareError, match="gates"):
        model.merge()
    with pytest.raises(rs.RankshareError, match="gates"):
        model.merge_and_unload()
    with pytest.raises(rs.RankshareError, match="3 finite numbers"):
        model.merge(gates=[0.5, 0.5])


@torch.no_grad()
@pytest.mark.parametrize("method", ["mor", "moelora"])
def test_mixture_merges_exactly_with_constant_gates(family, method):
    """A zero router gives every token the gates 1/N; merging with gates = 1/N must give the same outputs."""
    model = rs.adapt(base_model(family), METHODS[method](family.targets))
    randomise_adapters(model)
    for layer in model.adapter_layers().values():
        layer.router.zero_()
    inputs = family.inputs()
    expected = run(model, inputs)
    assert not torch.allclose(expected, run(base_model(family), inputs), atol=1e-3)  # the update is not trivial
    original = {name: layer.base_layer.weight.clone() for name, layer in model.adapter_layers().items()}
    model.merge(gates=torch.full((3,), 1 / 3))
    torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=1e-5)
    model.unmerge()
    for name, layer in model.adapter_layers().items():
        torch.testing.assert_close(layer.base_layer.weight, original[name], rtol=0, atol=1e-6)
    plain = model.merge_and_unload(gates=[1 / 3] * 3)
    torch.testing.assert_close(run(plain, inputs), expected, rtol=0, atol=1e-5)


def test_unmerge_without_merge_is_harmless():
    from conftest import FAMILIES

    model = rs.adapt(base_model(FAMILIES["mlp"]), METHODS["lotr"](["0"]))
    before = model.base_model[0].base_layer.weight.clone()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model.unmerge()
    assert torch.equal(model.base_model[0].base_layer.weight, before)
