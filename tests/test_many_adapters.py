"""Several named adapters on one base model: switching, mixed batches, a shared LoTR basis, files, refusals."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import rankshare as rs
from conftest import FAMILIES, base_model, run

ROW_NAMES = ["lotr", "mor", "__base__", "moelora", "news", "mor", "sentiment", "lotr"]


def token_inputs(rows: int = len(ROW_NAMES)) -> dict:
    ids = torch.randint(0, 50, (rows, 7), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids}


def configs(targets: list[str]) -> dict[str, rs.AdapterConfig]:
    """Four methods, one of them on a basis, and one adapter on fewer modules than the others."""
    return {
        "lotr": rs.LotrConfig(rank=4, alpha=8, target_modules=targets),
        "mor": rs.MorConfig(rank=3, num_experts=3, target_modules=targets),
        "moelora": rs.MoeLoraConfig(rank=2, num_experts=2, target_modules=targets[:1]),
        "news": rs.LotrConfig(rank=4, alpha=4, target_modules=targets, basis="lotr"),
        "sentiment": rs.LotrConfig(rank=4, target_modules=targets, basis="lotr"),
    }


@torch.no_grad()
def randomise(model: rs.AdaptedModel, seed: int = 1) -> None:
    """Every adapter's tensors away from their init (cores and B are zero there), heads included."""
    generator = torch.Generator().manual_seed(seed)
    for name in model.adapter_configs:
        for tensor in model.adapter_state_dict(name).values():
            tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator))


def many_adapters(family_name: str, seed: int = 0) -> rs.AdaptedModel:
    family = FAMILIES[family_name]
    model = None
    for name, config in configs(family.targets).items():
        if model is None:
            model = rs.adapt(base_model(family, seed), config, modules_to_save=family.modules_to_save,
                             adapter_name=name)
        else:
            model.add_adapter(name, config, modules_to_save=family.modules_to_save)
    randomise(model)
    return model


@torch.no_grad()
def alone(model: rs.AdaptedModel, inputs: dict) -> dict[str, torch.Tensor]:
    """Each adapter's outputs on the whole batch with it active, and the base model's."""
    outputs = {}
    active = model.active_adapter
    for name in model.adapter_configs:
        model.set_adapter(name)
        outputs[name] = run(model, inputs)
    model.set_adapter(active)
    with model.disable_adapter():
        outputs["__base__"] = run(model, inputs)
    return outputs


def rows_of(outputs: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.stack([outputs[name][row] for row, name in enumerate(names)])


def snapshot(model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor], dict[str, bool]]:
    return (repr(model), {k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()})


def assert_unchanged(model: torch.nn.Module, before) -> None:
    structure, state, flags = snapshot(model)
    assert structure == before[0]
    assert state.keys() == before[1].keys() and all(torch.equal(state[k], before[1][k]) for k in state)
    assert flags == before[2]


# -- mixed batches ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family_name", ["llama", "gpt2", "bert"])
def test_each_row_of_a_mixed_batch_equals_its_adapter_alone(family_name):
    model = many_adapters(family_name)
    inputs = token_inputs()
    expected = rows_of(alone(model, inputs), ROW_NAMES)
    with torch.no_grad():
        mixed = run(model, {**inputs, "adapter_names": ROW_NAMES})
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[0], expected[4])  # the rows really differ: adapters are not at init


def test_a_router_sees_only_the_rows_of_its_adapter(monkeypatch):
    model = many_adapters("llama")
    seen = []
    original = rs.MorLayer.router_probs

    def record(layer, x):
        seen.append(x.shape[0])
        return original(layer, x)

    monkeypatch.setattr(rs.MorLayer, "router_probs", record)
    with torch.no_grad():
        model(**token_inputs(), adapter_names=ROW_NAMES)
    assert seen and set(seen) == {ROW_NAMES.count("mor")}


def test_generation_mixes_adapters_per_prompt():
    model = many_adapters("llama").eval()
    prompts = token_inputs(4)["input_ids"][:, :3]
    names = ["news", "__base__", "mor", "lotr"]
    expected = []
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                out = model.generate(prompts[row : row + 1], max_new_tokens=4, do_sample=False)
        else:
            model.set_adapter(name)
            out = model.generate(prompts[row : row + 1], max_new_tokens=4, do_sample=False)
        expected.append(out[0])
    mixed = model.generate(prompts, max_new_tokens=4, do_sample=False, adapter_names=names)
    assert torch.equal(mixed, torch.stack(expected))


def test_heads_of_other_label_sets_are_padded_with_minus_infinity(tmp_path):
    family = FAMILIES["bert"]
    torch.manual_seed(0)
    wide = rs.adapt(base_model(family), rs.LotrConfig(rank=2, target_modules=["query"]), modules_to_save=["classifier"])
    randomise(wide)
    wide.save_pretrained(tmp_path / "wide")
    narrow_base = base_model(family)
    narrow_base.classifier = torch.nn.Linear(32, 2)
    narrow = rs.adapt(narrow_base, rs.MorConfig(rank=2, num_experts=2, target_modules=["value"]),
                      modules_to_save=["classifier"])
    randomise(narrow)
    narrow.save_pretrained(tmp_path / "narrow")
    model = rs.AdaptedModel.from_pretrained(base_model(family), tmp_path / "wide", adapter_name="wide")
    model.load_adapter(tmp_path / "narrow", "narrow")
    inputs = token_inputs(3)
    with torch.no_grad():
        mixed = run(model, {**inputs, "adapter_names": ["narrow", "wide", "narrow"]})
        torch.testing.assert_close(mixed[1], run(wide.eval(), inputs)[1])
        torch.testing.assert_close(mixed[[0, 2], :2], run(narrow.eval(), inputs)[[0, 2]])
    assert mixed.shape == (3, 3) and torch.isneginf(mixed[[0, 2], 2]).all()


# -- switching ----------------------------------------------------------------------------------------------


def test_disable_adapter_gives_the_base_models_outputs():
    family = FAMILIES["gpt2"]
    with torch.no_grad():
        base_outputs = run(base_model(family), token_inputs())
    model = many_adapters("gpt2")
    with torch.no_grad():
        adapted = run(model, token_inputs())
        with model.disable_adapter():
            torch.testing.assert_close(run(model, token_inputs()), base_outputs, rtol=0, atol=0)
        torch.testing.assert_close(run(model, token_inputs()), adapted, rtol=0, atol=0)


def test_only_the_active_adapters_own_tensors_train():
    model = many_adapters("bert")
    for name in model.adapter_configs:
        model.set_adapter(name)
        assert model.active_adapter == name
        trainable = {p.data_ptr() for p in model.parameters() if p.requires_grad}
        assert trainable == {t.data_ptr() for t in model.adapter_state_dict(name).values()}, name
    model.set_adapter("news")  # on a basis: its cores and head; the basis's U and V stay frozen
    factors = [p for group in model.shared["lotr"].values() for p in group.parameters()]
    assert factors and not any(p.requires_grad for p in factors)
    basis = {id(group) for group in model.shared["lotr"].values()}
    assert {id(layer.group) for layer in model.adapter_layers("news").values()} == basis
    assert "news" not in model.shared  # it owns no factors


def test_merge_and_unload_merges_the_active_adapter_only():
    model = many_adapters("llama")
    model.set_adapter("news")
    with torch.no_grad():
        expected = run(model, token_inputs())
        plain = model.merge_and_unload()
        torch.testing.assert_close(run(plain, token_inputs()), expected, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, (rs.AdaptedLinear, rs.SavedModule)) for m in plain.modules())


def test_deleting_every_adapter_gives_back_the_base_model():
    family = FAMILIES["bert"]
    with torch.no_grad():
        base_outputs = run(base_model(family), token_inputs())
    model = many_adapters("bert")
    for name in ["news", "sentiment", "mor", "lotr", "moelora"]:
        model.delete_adapter(name)
    assert model.active_adapter is None and model.adapter_configs == {}
    assert not any(isinstance(m, (rs.AdaptedLinear, rs.SavedModule)) for m in model.base_model.modules())
    with torch.no_grad():
        torch.testing.assert_close(run(model, token_inputs()), base_outputs, rtol=0, atol=0)


# -- a shared basis -----------------------------------------------------------------------------------------


def test_an_adapter_on_a_basis_starts_as_the_base_model_and_trains_cores_only():
    family = FAMILIES["llama"]
    model = rs.adapt(base_model(family), rs.LotrConfig(rank=4, target_modules=family.targets), adapter_name="basis")
    randomise(model)
    model.add_adapter("task", rs.LotrConfig(rank=4, target_modules=family.targets, basis="basis"))
    model.set_adapter("task")
    with torch.no_grad(), model.disable_adapter():
        base_outputs = run(model, token_inputs())
    torch.testing.assert_close(run(model, token_inputs()), base_outputs, rtol=0, atol=0)
    # 3 groups (q, k, v) of L = 3 layers at r = 4: L r² per group, nothing else.
    assert model.num_trainable_parameters() == 3 * 3 * 4**2
    assert rs.LotrConfig(rank=4, target_modules=family.targets, basis="basis").num_trainable_parameters(
        {name: layer.base_layer.weight.shape for name, layer in model.adapter_layers("task").items()}) == 144


def test_an_adapter_file_on_a_basis_holds_only_its_cores(tmp_path):
    model = many_adapters("llama")
    model.save_pretrained(tmp_path, adapter_name="news")
    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_length])
    keys = sorted(key for key in header if key != "__metadata__")
    assert keys == sorted(f"model.layers.{i}.self_attn.{p}.core" for i in range(3) for p in ("q_proj", "k_proj",
                                                                                             "v_proj"))
    groups, layers, rank = 3, 3, 4
    assert len(data) == 8 + header_length + 4 * groups * layers * rank**2
    record = json.loads((tmp_path / "adapter_config.json").read_text())
    assert record["config"]["basis"] == "lotr" and record["basis_fingerprint"] == model.basis_fingerprint("lotr")


def test_ten_tasks_on_one_tucker_basis_hold_the_basis_once():
    family = FAMILIES["gpt2"]  # 3 groups of 3 layers: attn.c_attn 96×32, attn.c_proj 32×32, mlp.c_proj 32×128
    model = rs.adapt(base_model(family), rs.LotrConfig(rank=4, target_modules=family.targets, init="tucker",
                                                       freeze_factors=True), adapter_name="basis")
    assert model.num_trainable_parameters() == 3 * 3 * 4**2  # a basis with no task of its own: zero cores
    for task in range(10):
        model.add_adapter(f"task{task}", rs.LotrConfig(rank=4, target_modules=family.targets, basis="basis"))
    held = {p.data_ptr(): p.numel() for p in model.parameters() if p.data_ptr() not in
            {q.data_ptr() for q in base_model(family).parameters()}}
    adapter_tensors = {p.data_ptr(): p.numel() for name in model.adapter_configs
                       for p in model.adapter_state_dict(name).values()}
    basis = 4 * (96 + 32) + 4 * (32 + 32) + 4 * (32 + 128)
    assert sum(adapter_tensors.values()) == basis + 11 * 3 * 3 * 4**2
    assert len(held) >= len(adapter_tensors)
    assert len(model.shared) == 1


def test_a_basis_that_does_not_fit_is_refused_and_nothing_changes():
    model = many_adapters("llama")
    before = snapshot(model)
    targets = FAMILIES["llama"].targets
    for config, message in [
        (rs.LotrConfig(rank=2, target_modules=targets, basis="lotr"), "same rank"),
        (rs.LotrConfig(rank=4, target_modules=targets[:2], basis="lotr"), "grouped the same way"),
        (rs.LotrConfig(rank=4, target_modules=targets, basis="nothing"), "does not have"),
        (rs.LotrConfig(rank=4, target_modules=targets, basis="mor"), "no LoTR groups"),
    ]:
        with pytest.raises(rs.RankshareError, match=message):
            model.add_adapter("new", config)
        assert_unchanged(model, before)


# -- files --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family_name", ["llama", "bert"])
def test_every_adapter_round_trips_through_files_into_a_fresh_base(tmp_path, family_name):
    model = many_adapters(family_name)
    inputs = token_inputs()
    with torch.no_grad():
        expected = run(model, {**inputs, "adapter_names": ROW_NAMES})
    for name in model.adapter_configs:
        model.save_pretrained(tmp_path / name, adapter_name=name)
    fresh = rs.AdaptedModel.from_pretrained(base_model(FAMILIES[family_name]), tmp_path / "lotr", adapter_name="lotr")
    for name in ["mor", "moelora", "news", "sentiment"]:
        fresh.load_adapter(tmp_path / name, name)
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, {**inputs, "adapter_names": ROW_NAMES}), expected, rtol=0, atol=0)
    assert fresh.num_trainable_parameters() == 0  # loaded for inference


def test_a_basis_loaded_under_another_name_is_found_by_its_fingerprint(tmp_path):
    model = many_adapters("llama")
    model.save_pretrained(tmp_path / "lotr", adapter_name="lotr")
    model.save_pretrained(tmp_path / "news", adapter_name="news")
    fresh = rs.AdaptedModel.from_pretrained(base_model(FAMILIES["llama"]), tmp_path / "lotr", adapter_name="shared")
    fresh.load_adapter(tmp_path / "news", "news", basis="shared")
    assert fresh.basis_of("news") == "shared"
    model.set_adapter("news")
    fresh.set_adapter("news")
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, token_inputs()), run(model, token_inputs()), rtol=0, atol=0)


def test_loading_without_its_basis_or_with_changed_factors_is_refused_and_nothing_changes(tmp_path):
    model = many_adapters("llama")
    model.save_pretrained(tmp_path / "lotr", adapter_name="lotr")
    model.save_pretrained(tmp_path / "news", adapter_name="news")
    base = base_model(FAMILIES["llama"])
    before = snapshot(base)
    with pytest.raises(rs.RankshareError, match="basis 'lotr', which this model does not have"):
        rs.AdaptedModel.from_pretrained(base, tmp_path / "news")
    assert_unchanged(base, before)

    fresh = rs.AdaptedModel.from_pretrained(base, tmp_path / "lotr", adapter_name="lotr")
    with torch.no_grad():
        next(iter(fresh.shared["lotr"].values())).left.mul_(2)  # the basis trained further since
    before = snapshot(fresh)
    with pytest.raises(rs.RankshareError, match="other factors than those of adapter 'lotr'"):
        fresh.load_adapter(tmp_path / "news", "news")
    assert_unchanged(fresh, before)
    assert list(fresh.adapter_configs) == ["lotr"]


def test_deleting_a_basis_in_use_is_refused():
    model = many_adapters("gpt2")
    before = snapshot(model)
    with pytest.raises(rs.RankshareError, match=r"'lotr' is the basis of \['news', 'sentiment'\]"):
        model.delete_adapter("lotr")
    assert_unchanged(model, before)
    model.delete_adapter("news")
    model.delete_adapter("sentiment")
    model.delete_adapter("lotr")
    assert list(model.adapter_configs) == ["mor", "moelora"]


# -- refusals -----------------------------------------------------------------------------------------------


def test_bad_adapter_names_are_refused_and_nothing_changes():
    model = many_adapters("llama")
    inputs = token_inputs()
    before = snapshot(model)
    for names, message in [
        (["lotr", "nope", *ROW_NAMES[2:]], r"holds \['nope'\], which name no adapter"),
        (ROW_NAMES[:-1], "gives 7 names for a batch of 8"),
        ("lotr", "must be a list"),
    ]:
        with pytest.raises(rs.RankshareError, match=message):
            model(**inputs, adapter_names=names)
        assert_unchanged(model, before)
    with model.disable_adapter(), pytest.raises(rs.RankshareError, match="disable_adapter"):
        model(**inputs, adapter_names=ROW_NAMES)
    assert_unchanged(model, before)
    model.merge()
    merged = snapshot(model)
    with pytest.raises(rs.RankshareError, match="merged into the base weights"):
        model(**inputs, adapter_names=ROW_NAMES)
    with pytest.raises(rs.RankshareError, match="unmerge"):
        model.set_adapter("mor")
    assert_unchanged(model, merged)


def test_unknown_and_clashing_adapter_names_are_refused():
    model = many_adapters("mlp")
    before = snapshot(model)
    targets = FAMILIES["mlp"].targets
    with pytest.raises(rs.RankshareError, match="No adapter named 'nope'"):
        model.set_adapter("nope")
    with pytest.raises(rs.RankshareError, match="No adapter named 'nope'"):
        model.delete_adapter("nope")
    with pytest.raises(rs.RankshareError, match="already has an adapter named 'mor'"):
        model.add_adapter("mor", rs.LotrConfig(rank=2, target_modules=targets))
    for bad in ["", "a.b", "__base__"]:
        with pytest.raises(rs.RankshareError, match="adapter name must be"):
            model.add_adapter(bad, rs.LotrConfig(rank=2, target_modules=targets))
    assert_unchanged(model, before)
