"""save_pretrained / from_pretrained: adapter tensors only, each shared factor once, outputs reproduced."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import rankshare as rs
from conftest import FAMILIES, METHODS, base_model, randomise_adapters, run


def fresh_base(family, trained_base):
    """The same pretrained weights, built under another seed: only the loaded file can make outputs agree."""
    base = base_model(family, seed=123)
    base.load_state_dict(trained_base)
    return base


def test_round_trip_reproduces_outputs(adapted, family, tmp_path):
    pristine = {k: v.clone() for k, v in base_model(family).state_dict().items()}
    randomise_adapters(adapted)
    for name in family.modules_to_save:
        with torch.no_grad():
            for p in adapted.base_model.get_submodule(name).parameters():
                p.add_(1.0)
    inputs = family.inputs()
    expected = run(adapted, inputs)
    adapted.save_pretrained(tmp_path)

    torch.manual_seed(99)
    loaded = rs.AdaptedModel.from_pretrained(fresh_base(family, pristine), tmp_path)
    torch.testing.assert_close(run(loaded, inputs), expected, rtol=0, atol=0)
    assert loaded.num_trainable_parameters() == 0
    trainable = rs.AdaptedModel.from_pretrained(fresh_base(family, pristine), tmp_path, is_trainable=True)
    assert trainable.num_trainable_parameters() == adapted.num_trainable_parameters()


def test_file_holds_each_adapter_tensor_once(adapted, tmp_path):
    adapted.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    with open(path, "rb") as f:
        header_length = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_length))
    header.pop("__metadata__", None)
    adapter_numbers = sum(t.numel() for t in adapted.adapter_state_dict().values())
    assert adapter_numbers >= adapted.num_trainable_parameters()
    assert path.stat().st_size == 8 + header_length + 4 * adapter_numbers  # float32, nothing else
    assert header_length <= 200 * len(header) + 1024
    assert not any("base_layer" in key for key in header)


def test_config_file_records_method_version_and_modules(tmp_path):
    family = FAMILIES["gpt2"]
    model = rs.adapt(base_model(family), rs.LotrConfig(rank=2, target_modules=["c_attn"], init="tucker"))
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "adapter_config.json").read_text())
    assert record["method"] == "lotr"
    assert record["rankshare_version"] == rs.__version__
    assert record["config"]["init"] == "tucker" and record["config"]["rank"] == 2
    assert record["modules"]["transformer.h.1.attn.c_attn"] == [96, 32]
    assert record["shared"] == {"transformer/h/*/attn/c_attn": [f"transformer.h.{i}.attn.c_attn" for i in range(3)]}


def test_loading_into_another_architecture_names_the_mismatch(tmp_path):
    model = rs.adapt(base_model(FAMILIES["mlp"]), rs.LotrConfig(rank=2, target_modules=["0", "2"]))
    model.save_pretrained(tmp_path)
    wider = torch.nn.Sequential(torch.nn.Linear(16, 20), torch.nn.Tanh(), torch.nn.Linear(20, 16))
    with pytest.raises(rs.RankshareError, match=r"'0' is 20×16 .* but 16×16"):
        rs.AdaptedModel.from_pretrained(wider, tmp_path)
    with pytest.raises(rs.RankshareError, match="lacks"):
        rs.AdaptedModel.from_pretrained(torch.nn.Sequential(torch.nn.Linear(16, 16)), tmp_path)


def test_missing_or_damaged_files_are_clear_errors(tmp_path):
    model = rs.adapt(base_model(FAMILIES["mlp"]), METHODS["mor"](["0"]))
    with pytest.raises(rs.RankshareError, match="No adapter_config.json"):
        rs.AdaptedModel.from_pretrained(base_model(FAMILIES["mlp"]), tmp_path)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(rs.RankshareError, match="not a readable safetensors"):
        rs.AdaptedModel.from_pretrained(base_model(FAMILIES["mlp"]), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(rs.RankshareError, match="not valid JSON"):
        rs.AdaptedModel.from_pretrained(base_model(FAMILIES["mlp"]), tmp_path)


def test_save_leaves_no_temporary_files(tmp_path):
    model = rs.adapt(base_model(FAMILIES["mlp"]), METHODS["lotr"](["0"]))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
