"""Choosing targets and configs: suffixes, regexes, and a clear error for everything else."""

from __future__ import annotations

import math

import pytest
import torch

import rankshare as rs
from conftest import FAMILIES, base_model, randomise_adapters, run


def test_suffix_and_regex_select_the_same_modules():
    by_suffix = rs.adapt(base_model(FAMILIES["llama"]), rs.LotrConfig(rank=2, target_modules=["q_proj"]))
    regex = r"model\.layers\.\d+\.self_attn\.q_proj"
    by_regex = rs.adapt(base_model(FAMILIES["llama"]), rs.LotrConfig(rank=2, target_modules=regex))
    expected = [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    assert by_suffix.targeted_module_names == by_regex.targeted_module_names == expected
    first_layer = rs.MorConfig(rank=2, target_modules=r"model\.layers\.0\..*_proj")
    only_first = rs.adapt(base_model(FAMILIES["llama"]), first_layer)
    assert len(only_first.targeted_module_names) == 7


def test_replaced_in_place_with_base_layer_kept():
    base = base_model(FAMILIES["bert"])
    query = base.bert.encoder.layer[1].attention.self.query
    model = rs.adapt(base, rs.MoeLoraConfig(rank=2, num_experts=2, target_modules=["query"]))
    slot = model.get_submodule("base_model.bert.encoder.layer.1.attention.self.query")
    assert isinstance(slot, rs.AdaptedLinear) and slot.base_layer is query
    assert isinstance(slot.adapters["default"], rs.MoeLoraLayer) and slot.adapters["default"].base_layer is query
    assert base.get_submodule("bert.encoder.layer.1.attention.self.query") is slot
    assert model.config is base.config  # unknown attributes go to the base model


def test_generate_goes_through_the_adapters():
    family = FAMILIES["llama"]
    model = rs.adapt(base_model(family), rs.LotrConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    randomise_adapters(model)
    prompt = family.inputs()["input_ids"][:1]
    generated = model.generate(prompt, max_new_tokens=3, do_sample=False)
    merged = model.merge_and_unload().generate(prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, prompt.shape[1] + 3) and torch.equal(generated, merged)


def test_nothing_matched_lists_the_linear_layers():
    with pytest.raises(rs.RankshareError) as error:
        rs.adapt(base_model(FAMILIES["llama"]), rs.LotrConfig(rank=2, target_modules=["query"]))
    message = str(error.value)
    assert "No module matched" in message and "model.layers.*.self_attn.q_proj" in message and "lm_head" in message


def test_unsupported_module_type_is_refused():
    with pytest.raises(rs.RankshareError, match="BertAttention.*torch.nn.Linear"):
        rs.adapt(base_model(FAMILIES["bert"]), rs.LotrConfig(rank=2, target_modules=["attention"]))
    with pytest.raises(rs.RankshareError, match="Embedding"):
        rs.adapt(base_model(FAMILIES["llama"]), rs.MorConfig(rank=2, target_modules=["embed_tokens"]))


def test_adapting_twice_is_refused():
    model = rs.adapt(base_model(FAMILIES["mlp"]), rs.LotrConfig(rank=2, target_modules=["0"]))
    with pytest.raises(rs.RankshareError, match="already has rankshare adapters"):
        rs.adapt(model.base_model, rs.LotrConfig(rank=2, target_modules=["2"]))


def test_modules_to_save_must_exist_and_not_overlap_targets():
    with pytest.raises(rs.RankshareError, match="matched no module"):
        rs.adapt(base_model(FAMILIES["bert"]), rs.LotrConfig(rank=2, target_modules=["query"]),
                 modules_to_save=["head"])
    with pytest.raises(rs.RankshareError, match="overlap"):
        rs.adapt(base_model(FAMILIES["bert"]), rs.LotrConfig(rank=2, target_modules=["query"]),
                 modules_to_save=["query"])


def test_lotr_rank_larger_than_layer_is_refused():
    with pytest.raises(rs.RankshareError, match="exceeds min"):
        rs.adapt(base_model(FAMILIES["mlp"]), rs.LotrConfig(rank=17, target_modules=["0"]))


def test_plain_sequential_layers_form_one_group():
    model = rs.adapt(base_model(FAMILIES["mlp"]), rs.LotrConfig(rank=2, target_modules=["0", "2", "4", "6"]))
    assert sorted(model.shared["default"]) == ["*@16x16", "*@3x16"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: rs.LotrConfig(rank=0, target_modules=["q"]), "rank must be an integer >= 1"),
        (lambda: rs.LotrConfig(rank=-3, target_modules=["q"]), "rank"),
        (lambda: rs.LotrConfig(rank=2.5, target_modules=["q"]), "rank"),
        (lambda: rs.LotrConfig(rank=True, target_modules=["q"]), "rank"),
        (lambda: rs.MorConfig(rank=2, alpha=math.inf, target_modules=["q"]), "alpha must be a finite number"),
        (lambda: rs.MorConfig(rank=2, alpha="8", target_modules=["q"]), "alpha"),
        (lambda: rs.MorConfig(rank=2, num_experts=0, target_modules=["q"]), "num_experts"),
        (lambda: rs.LotrConfig(rank=2, share="everything", target_modules=["q"]), "share must be one of"),
        (lambda: rs.LotrConfig(rank=2, init="svd", target_modules=["q"]), "init"),
        (lambda: rs.LotrConfig(rank=2, freeze_factors="yes", target_modules=["q"]), "freeze_factors"),
        (lambda: rs.LotrConfig(rank=2, target_modules=[]), "target_modules"),
        (lambda: rs.LotrConfig(rank=2), "target_modules"),
        (lambda: rs.AdapterConfig.from_dict({"method": "dora", "rank": 2}), "Unknown adapter method 'dora'"),
        (lambda: rs.AdapterConfig.from_dict({"method": "mor", "rank": 2, "experts": 3}),
         r"no field\(s\) \['experts'\]"),
    ],
)
def test_bad_configs_are_refused(make, message):
    with pytest.raises(rs.RankshareError, match=message):
        make()


def test_config_round_trips_through_dict():
    config = rs.LotrConfig(rank=4, alpha=16, target_modules=["q_proj"], share="by_shape", init="tucker",
                           freeze_factors=True)
    assert rs.AdapterConfig.from_dict(config.to_dict()) == config
    assert config.scale == 4.0
    assert rs.MorConfig(rank=4, target_modules=["q"]).scale == 1.0  # alpha defaults to rank


@pytest.mark.parametrize("method", ["lotr", "mor", "moelora"])
def test_bf16(method):
    """Adapters over a bf16 base stay float32 and run; a model cast to bf16 runs; both close to fp32."""
    from conftest import METHODS, randomise_adapters

    family = FAMILIES["llama"]
    inputs = family.inputs()
    model = rs.adapt(base_model(family), METHODS[method](family.targets))
    randomise_adapters(model, std=0.05)
    with torch.no_grad():
        expected = run(model, inputs)
        model.to(torch.bfloat16)
        cast = run(model, inputs)
    assert cast.dtype == torch.bfloat16
    torch.testing.assert_close(cast.float(), expected, rtol=0.05, atol=0.05)

    base16 = base_model(family).to(torch.bfloat16)
    model16 = rs.adapt(base16, METHODS[method](family.targets))
    assert {t.dtype for t in model16.adapter_state_dict().values()} == {torch.float32}
    with torch.no_grad():
        out = run(model16, inputs)
    torch.testing.assert_close(out.float(), run(base_model(family), inputs), rtol=0.05, atol=0.05)
    loss = run(model16, inputs).float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in model16.parameters() if p.requires_grad and p.dtype == torch.float32)
