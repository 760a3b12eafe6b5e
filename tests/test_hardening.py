"""What real models need beyond the tiny ones: half-precision heads, per-layer gates, names that clash with
attributes, exact mixed-batch routing, derived alpha, a basis cast to another dtype, third-party layers that give
only ``lora_factors``, tied output embeddings, and PEFT's ``"all-linear"``."""

from __future__ import annotations

import dataclasses
import math
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import rankshare as rs
from conftest import FAMILIES, base_model, randomise_adapters, run
from test_many_adapters import assert_unchanged, snapshot


def ids(rows: int = 3, length: int = 6, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 50, (rows, length), generator=torch.Generator().manual_seed(seed))


# -- 1. heads trained whole on a half-precision base ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_head_trained_whole_is_float32_on_a_half_precision_base_and_trains(dtype):
    base = base_model(FAMILIES["bert"]).to(dtype)
    model = rs.adapt(base, rs.LotrConfig(rank=4, target_modules=["query", "value"]), modules_to_save=["classifier"])
    slot = model.base_model.classifier
    assert {p.dtype for p in slot.copies["default"].parameters()} == {torch.float32}
    assert {p.dtype for p in slot.original.parameters()} == {dtype}  # the base model's own head is untouched
    inputs, labels = ids(8), torch.arange(8) % 3
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        out = model(input_ids=inputs, labels=labels)
        assert out.logits.dtype == dtype  # cast back at the boundary: the model sees its own dtype
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    plain = model.merge_and_unload()
    assert plain.classifier.weight.dtype == dtype  # the merged model is all of the base's dtype


# -- 2. per-layer gates --------------------------------------------------------------------------------------


def _mor_reference_delta(layer: rs.MorLayer, gates: torch.Tensor) -> torch.Tensor:
    """ΔW = s Σ_i g_i diag(b_i) B diag(a_i) A, written out."""
    out = torch.zeros(layer.out_features, layer.in_features)
    for i, g in enumerate(gates):
        out += g * torch.diag(layer.scale_out[i]) @ layer.lora_B @ torch.diag(layer.scale_in[i]) @ layer.lora_A
    return layer.scale * out


@torch.no_grad()
def test_per_layer_gates_merge_and_export_each_layer_with_its_own(tmp_path):
    family = FAMILIES["llama"]
    model = rs.adapt(base_model(family), rs.MorConfig(rank=3, num_experts=4, alpha=6, target_modules=family.targets))
    randomise_adapters(model)
    generator = torch.Generator().manual_seed(3)
    gates = {name: torch.softmax(2 * torch.randn(4, generator=generator), 0).tolist()
             for name in model.adapter_layers()}
    reference = base_model(family)
    modules = dict(reference.named_modules())
    for name, layer in model.adapter_layers().items():
        modules[name].weight += _mor_reference_delta(layer, torch.tensor(gates[name]))
    expected = run(reference, {"input_ids": ids()})

    model.merge(gates=gates)
    torch.testing.assert_close(run(model, {"input_ids": ids()}), expected, rtol=1e-5, atol=1e-5)
    model.unmerge()
    rs.export_peft(model, tmp_path / "peft", gates=gates)
    exported = peft.PeftModel.from_pretrained(base_model(family), tmp_path / "peft").eval()
    torch.testing.assert_close(run(exported, {"input_ids": ids()}), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(model.merge_and_unload(gates=gates), {"input_ids": ids()}), expected,
                               rtol=1e-5, atol=1e-5)


def test_per_layer_gates_must_name_every_layer_and_only_those():
    family = FAMILIES["llama"]
    model = rs.adapt(base_model(family), rs.MorConfig(rank=3, num_experts=2, target_modules=family.targets))
    randomise_adapters(model)
    layers = list(model.adapter_layers())
    before = snapshot(model)
    with pytest.raises(rs.RankshareError, match="no gates for 1 of"):
        model.merge(gates={name: [0.5, 0.5] for name in layers[1:]})
    with pytest.raises(rs.RankshareError, match="name no layer of adapter"):
        model.merge(gates={**{name: [0.5, 0.5] for name in layers}, "lm_head": [0.5, 0.5]})
    assert_unchanged(model, before)


# -- 4. adapter names that are attributes --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train", "to", "keys", "forward", "items", "state_dict"])
def test_adapter_names_that_are_module_attributes_are_refused_and_nothing_changes(name):
    family = FAMILIES["llama"]
    model = rs.adapt(base_model(family), rs.LotrConfig(rank=2, target_modules=family.targets))
    before = snapshot(model)
    with pytest.raises(rs.RankshareError, match=f"{name!r} is the name of an attribute"):
        model.add_adapter(name, rs.MorConfig(rank=2, num_experts=2, target_modules=family.targets))
    assert_unchanged(model, before)
    with pytest.raises(rs.RankshareError, match="name of an attribute"):
        rs.adapt(base_model(family), rs.LotrConfig(rank=2, target_modules=family.targets), adapter_name=name)


# -- 5. mixed batches route by exact row counts --------------------------------------------------------------


class SequenceFirst(nn.Module):
    """A block that runs its linear layer on (T, B, d): the layer's first dimension is not the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        return self.proj(x.transpose(0, 1)).transpose(0, 1)


def test_a_layer_whose_rows_are_not_the_batch_is_refused_not_misrouted():
    torch.manual_seed(0)
    model = rs.adapt(SequenceFirst(), rs.LotrConfig(rank=2, target_modules=["proj"]), adapter_name="a")
    model.add_adapter("b", rs.LotrConfig(rank=2, target_modules=["proj"]))
    randomise_adapters(model)
    x = torch.randn(2, 4, 8)  # 2 examples of 4 steps: the layer sees 4 rows, a multiple of the 2 names
    with pytest.raises(rs.RankshareError, match="received 4 rows"):
        model(x, adapter_names=["a", "b"])


class ScaledHead(nn.Module):
    """A head that takes a per-example tensor beside its input."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x), weight)


class WeightedLinear(nn.Linear):
    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # weight: (B, 1)
        return super().forward(x) * weight


@torch.no_grad()
def test_a_saved_module_gets_its_rows_of_every_per_example_argument():
    torch.manual_seed(0)
    net = ScaledHead()
    net.head = WeightedLinear(8, 3)
    model = rs.adapt(net, rs.LotrConfig(rank=2, target_modules=["body"]), modules_to_save=["head"], adapter_name="a")
    model.add_adapter("b", rs.LotrConfig(rank=2, target_modules=["body"]), modules_to_save=["head"])
    randomise_adapters(model)
    for copy in model.base_model.head.copies.values():
        copy.weight.add_(torch.randn_like(copy.weight))
    x, weight = torch.randn(4, 8), torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    names = ["a", "b", "b", "a"]
    expected = []
    for row, name in enumerate(names):
        model.set_adapter(name)
        expected.append(model(x[row : row + 1], weight[row : row + 1])[0])
    torch.testing.assert_close(model(x, weight, adapter_names=names), torch.stack(expected))


@torch.no_grad()
@pytest.mark.parametrize("options", [{"num_beams": 2, "num_return_sequences": 2},
                                     {"do_sample": True, "num_return_sequences": 3}])
def test_generation_declares_how_many_rows_each_prompt_becomes(options):
    from test_many_adapters import many_adapters

    model = many_adapters("llama").eval()
    prompts = ids(3, 3)
    names = ["news", "__base__", "mor"]
    expected = []
    for row, name in enumerate(names):
        torch.manual_seed(0)
        if name == "__base__":
            with model.disable_adapter():
                expected.append(model.generate(prompts[row : row + 1], max_new_tokens=3, **options))
        else:
            model.set_adapter(name)
            expected.append(model.generate(prompts[row : row + 1], max_new_tokens=3, **options))
    torch.manual_seed(0)
    mixed = model.generate(prompts, max_new_tokens=3, adapter_names=names, **options)
    if options.get("do_sample"):  # sampling draws other numbers for a batch than for one row: compare shapes
        assert mixed.shape == (3 * options["num_return_sequences"], 6)
    else:
        torch.testing.assert_close(mixed, torch.cat(expected))


# -- 7. alpha = None stays derived ----------------------------------------------------------------------------


def test_alpha_none_stays_derived_through_replace():
    for cls in (rs.LotrConfig, rs.MorConfig, rs.MoeLoraConfig):
        config = cls(rank=8, target_modules=["q"])
        assert config.alpha is None and config.scale == 1.0
        wider = dataclasses.replace(config, rank=16)
        assert wider.alpha is None and wider.scale == 1.0
        fixed = dataclasses.replace(cls(rank=8, alpha=16, target_modules=["q"]), rank=16)
        assert fixed.alpha == 16 and fixed.scale == 1.0
        assert rs.AdapterConfig.from_dict(config.to_dict()) == config


# -- 8. a basis cast to another dtype --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_adapter_on_a_basis_loads_after_the_model_is_cast(tmp_path, dtype):
    family = FAMILIES["llama"]
    model = rs.adapt(base_model(family), rs.LotrConfig(rank=4, target_modules=family.targets), adapter_name="basis")
    model.add_adapter("task", rs.LotrConfig(rank=4, target_modules=family.targets, basis="basis"))
    randomise_adapters(model)
    model.save_pretrained(tmp_path / "basis", adapter_name="basis")
    model.save_pretrained(tmp_path / "task", adapter_name="task")

    fresh = rs.AdaptedModel.from_pretrained(base_model(family), tmp_path / "basis", adapter_name="basis").to(dtype)
    fresh.load_adapter(tmp_path / "task", "task")
    fresh.set_adapter("task")
    assert fresh.adapter_layers()["model.layers.0.self_attn.q_proj"].core.dtype == torch.float32

    changed = rs.AdaptedModel.from_pretrained(base_model(family), tmp_path / "basis", adapter_name="basis")
    with torch.no_grad():
        next(iter(changed.shared["basis"].values())).left.mul_(1.01)
    with pytest.raises(rs.RankshareError, match="fingerprints differ"):
        changed.to(dtype).load_adapter(tmp_path / "task", "task")


# -- 10. smaller ones -------------------------------------------------------------------------------------------


class PerLayerRankLayer(rs.AdapterLayer):
    """A third-party update that gives only its LoRA form, with a rank of its own per layer, and keeps its tensors
    in a submodule (no parameters of its own)."""

    def __init__(self, base_layer: nn.Module, rank: int) -> None:
        super().__init__(base_layer, scale=0.5)
        self.factors = nn.ParameterDict({
            "A": nn.Parameter(torch.randn(rank, self.in_features, **self.factory) / 4),
            "B": nn.Parameter(torch.randn(self.out_features, rank, **self.factory) / 4)})

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x @ self.factors["A"].T) @ self.factors["B"].T

    def lora_factors(self, gates=None):
        return self.factors["B"], self.scale * self.factors["A"]


@dataclasses.dataclass
class PerLayerRankConfig(rs.AdapterConfig):
    method = "perlayerrank"
    title = "per-layer rank"

    def create_adapters(self, targets):
        return {name: PerLayerRankLayer(base, 1 + i % 3) for i, (name, base) in enumerate(targets.items())}, {}

    def num_trainable_parameters(self, shapes):
        return sum((1 + i % 3) * (d_in + d_out) for i, (d_out, d_in) in enumerate(shapes.values()))


@pytest.fixture
def per_layer_rank():
    rs.register(PerLayerRankConfig)
    yield PerLayerRankConfig
    rs.config.unregister("perlayerrank")


@torch.no_grad()
def test_a_method_with_lora_factors_alone_merges_and_exports_with_ranks_per_layer(per_layer_rank, tmp_path):
    family = FAMILIES["llama"]
    model = rs.adapt(base_model(family), per_layer_rank(target_modules=family.targets))
    layer = next(iter(model.adapter_layers().values()))
    assert layer.dtype == torch.float32  # its tensors live in a submodule
    expected = run(model, {"input_ids": ids()})
    rs.export_peft(model, tmp_path / "peft")
    exported = peft.PeftModel.from_pretrained(base_model(family), tmp_path / "peft").eval()
    torch.testing.assert_close(run(exported, {"input_ids": ids()}), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(model.merge_and_unload(), {"input_ids": ids()}), expected, rtol=1e-5, atol=1e-5)


def test_a_layer_without_tensors_reports_float32():
    class Empty(rs.AdapterLayer):
        pass

    assert Empty(nn.Linear(4, 4), 1.0).dtype == torch.float32


def tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def test_merging_into_a_tied_output_layer_unties_it_and_says_so(tmp_path):
    base = tied_llama()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    embeddings = base.model.embed_tokens.weight.clone()
    model = rs.adapt(base, rs.LotrConfig(rank=4, target_modules=["lm_head", "q_proj"]))
    randomise_adapters(model)
    expected = run(model, {"input_ids": ids()})
    with pytest.warns(UserWarning, match="lm_head.*tied"):
        plain = model.merge_and_unload()
    assert torch.equal(plain.model.embed_tokens.weight, embeddings)
    torch.testing.assert_close(run(plain, {"input_ids": ids()}), expected, rtol=1e-5, atol=1e-5)
    plain.save_pretrained(tmp_path / "merged")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(run(again, {"input_ids": ids()}), expected, rtol=1e-5, atol=1e-5)


# -- PEFT's habits ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family_name", ["llama", "gpt2", "bert"])
def test_all_linear_targets_what_peft_targets(family_name):
    family = FAMILIES[family_name]
    task = {"bert": "SEQ_CLS"}.get(family_name, "CAUSAL_LM")
    wrapped = peft.get_peft_model(base_model(family), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                      task_type=task))
    peft_targets = {name.removeprefix("base_model.model.") for name, module in wrapped.named_modules()
                    if isinstance(module, peft.tuners.lora.LoraLayer)}
    model = rs.adapt(base_model(family), rs.LotrConfig(rank=2, target_modules="all-linear"))
    assert set(model.targeted_module_names) == peft_targets
    assert len(peft_targets) > 3


def test_methods_reads_the_entry_points_once(monkeypatch):
    from importlib import metadata

    calls = []
    original = metadata.entry_points

    def counted(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(rs.config, "_entry_points_read", False)
    monkeypatch.setattr(metadata, "entry_points", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            rs.methods()
    assert len(calls) == 1


def test_the_package_says_it_is_typed():
    from importlib import resources

    assert resources.files("rankshare").joinpath("py.typed").is_file()
