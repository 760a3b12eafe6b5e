"""Export to PEFT's LoRA: PEFT, loading the exported folder, computes what rankshare computes."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

import rankshare as rs
from conftest import FAMILIES, base_model, randomise_adapters, run

GATES = [0.5, 0.3, 0.2]
CONFIGS = {
    "lotr": (lambda targets: rs.LotrConfig(rank=4, alpha=8, target_modules=targets), None),
    "mor": (lambda targets: rs.MorConfig(rank=4, num_experts=3, alpha=8, target_modules=targets), GATES),
    "moelora": (lambda targets: rs.MoeLoraConfig(rank=2, num_experts=3, alpha=4, target_modules=targets), GATES),
}


def token_inputs() -> dict:
    return {"input_ids": torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(4))}


@torch.no_grad()
def reference(model: rs.AdaptedModel, gates, inputs: dict) -> torch.Tensor:
    """rankshare's own outputs with the adapter's constant update: the merged model (exact, tested elsewhere)."""
    merged = copy.deepcopy(model)
    return run(merged.merge_and_unload(gates=gates) if gates else merged.merge_and_unload(), inputs)


@pytest.mark.parametrize("family_name", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_peft_loads_the_export_and_computes_rankshares_outputs(tmp_path, family_name, method):
    family = FAMILIES[family_name]
    make, gates = CONFIGS[method]
    model = rs.adapt(base_model(family), make(family.targets), modules_to_save=family.modules_to_save)
    randomise_adapters(model)
    with torch.no_grad():
        for name in family.modules_to_save:  # a trained head travels with the adapter
            for parameter in model.base_model.get_submodule(name).parameters():
                parameter.add_(1.0)
    inputs = token_inputs()
    expected = reference(model, gates, inputs)
    rs.export_peft(model, tmp_path, gates=gates)

    loaded = peft.PeftModel.from_pretrained(base_model(family), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, inputs), expected, rtol=1e-5, atol=1e-5)
        assert (run(base_model(family), inputs) - expected).abs().max() > 1e-3  # 100× the tolerance above
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["fan_in_fan_out"] == (family_name == "gpt2")
    rank = {"lotr": 4, "mor": 4, "moelora": 2 * 3}[method]
    assert saved["r"] == saved["lora_alpha"] == rank


def test_a_routed_adapter_without_gates_is_refused_and_nothing_is_written(tmp_path):
    family = FAMILIES["llama"]
    model = rs.adapt(base_model(family), CONFIGS["mor"][0](family.targets))
    with pytest.raises(rs.RankshareError, match="give gates"):
        rs.export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_several_exported_tasks_mix_in_peft_as_in_rankshare(tmp_path):
    family = FAMILIES["llama"]
    model = rs.adapt(base_model(family), rs.LotrConfig(rank=4, target_modules=family.targets), adapter_name="a")
    model.add_adapter("b", rs.LotrConfig(rank=4, target_modules=family.targets, basis="a"))
    randomise_adapters(model)
    with torch.no_grad():
        for layer in model.adapter_layers("b").values():
            layer.core.normal_()
    for name in ("a", "b"):
        rs.export_peft(model, tmp_path / name, adapter_name=name)
    served = peft.PeftModel.from_pretrained(base_model(family), str(tmp_path / "a"), adapter_name="a")
    served.load_adapter(str(tmp_path / "b"), adapter_name="b")
    names = ["b", "a", "__base__"]
    with torch.no_grad():
        expected = run(model, {**token_inputs(), "adapter_names": names})
        torch.testing.assert_close(run(served.eval(), {**token_inputs(), "adapter_names": names}), expected,
                                   rtol=1e-5, atol=1e-5)
