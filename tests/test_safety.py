"""Safe loading and saving: no pickle, clear errors for bad configs, files and base models, checked merges,
and saves that a kill can interrupt but never turn into a wrong adapter."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import rankshare as rs
from conftest import FAMILIES, METHODS, base_model, randomise_adapters, run

MLP = FAMILIES["mlp"]
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


def save_mlp_adapter(directory: Path, method: str = "mor", seed: int = 1) -> torch.Tensor:
    """Save a randomised adapter (with a trained head) on the MLP family; returns the outputs it must give."""
    model = rs.adapt(base_model(MLP), METHODS[method](MLP.targets), modules_to_save=MLP.modules_to_save)
    randomise_adapters(model, seed=seed)
    with torch.no_grad():
        model.base_model[6].weight.add_(seed)
    model.save_pretrained(directory)
    return run(model, MLP.inputs())


def load_mlp(directory: Path, base: nn.Module | None = None) -> rs.AdaptedModel:
    return rs.AdaptedModel.from_pretrained(base_model(MLP) if base is None else base, directory)


def edit_record(directory: Path, change) -> None:
    """Edit the config as a person would on purpose: apply ``change`` and delete the config's own checksum."""
    path = directory / CONFIG_NAME
    record = json.loads(path.read_text())
    change(record)
    record.pop("config_sha256", None)
    path.write_text(json.dumps(record))


def rewrite_tensors(directory: Path, change) -> None:
    """Replace the tensor file by ``change(tensors)`` and record its checksum, as a (bad) saver would."""
    tensors = safetensors.torch.load_file(directory / WEIGHTS_NAME)
    change(tensors)
    data = safetensors.torch.save(tensors)
    (directory / WEIGHTS_NAME).write_bytes(data)
    edit_record(directory, lambda record: record.update(weights_sha256=hashlib.sha256(data).hexdigest()))


def assert_untouched(base: nn.Module, pristine: dict[str, torch.Tensor]) -> None:
    """A refused load leaves the base model as it came: no adapter layers, same tensors, same trainability."""
    assert not any(isinstance(m, rs.AdapterLayer) for m in base.modules())
    for key, value in base.state_dict().items():
        assert torch.equal(value, pristine[key]), key
    assert all(p.requires_grad for p in base.parameters())


def refused(directory: Path, match: str) -> rs.RankshareError:
    base = base_model(MLP)
    pristine = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(rs.RankshareError, match=match) as caught:
        load_mlp(directory, base)
    assert_untouched(base, pristine)
    return caught.value


# -- never pickle -------------------------------------------------------------------------------------------


class Trap:
    """Unpickling this creates a file: proof, if the file appears, that something unpickled it."""

    def __init__(self, witness: Path) -> None:
        self.witness = witness

    def __reduce__(self):
        return open, (str(self.witness), "w")


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_named_like_safetensors_is_refused_unopened(tmp_path, writer):
    directory, witness = tmp_path / "adapter", tmp_path / "unpickled"
    save_mlp_adapter(directory)
    weights = directory / WEIGHTS_NAME
    if writer == "pickle":
        weights.write_bytes(pickle.dumps(Trap(witness)))
    else:
        torch.save({"0.lora_A": Trap(witness)}, weights)
    refused(directory, r"not a readable safetensors file .*looks like a pickle or torch.save\(\) file")
    assert not witness.exists()


# -- configs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(rank="8"), "rank must be an integer >= 1, got '8'"),
        (lambda c: c.update(rank=0), "rank must be an integer >= 1, got 0"),
        (lambda c: c.update(target_modules=5), "target_modules must be a non-empty list"),
        (lambda c: c.update(target_modules="("), "not a valid regular expression"),
        (lambda c: c.update(num_experts=0), "num_experts must be an integer >= 1"),
        (lambda c: c.update(alpha=math.nan), "alpha must be a finite number"),
        (lambda c: c.update(alpha="8"), "alpha must be a finite number"),
        (lambda c: c.pop("method"), "has no 'method'"),
        (lambda c: c.update(method="dora"), "Unknown adapter method 'dora'"),
        (lambda c: c.update(method=["mor"]), r"Unknown adapter method \['mor'\]"),
        (lambda c: c.update(dropout=0.1), r"has no field\(s\) \['dropout'\]"),
    ],
)
def test_a_bad_config_value_is_an_error_naming_the_file_and_field(tmp_path, change, message):
    save_mlp_adapter(tmp_path)
    edit_record(tmp_path, lambda record: change(record["config"]))
    error = refused(tmp_path, message)
    assert str(tmp_path / CONFIG_NAME) in str(error)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(config=[1, 2]), "has no 'config' object"),
        (lambda r: r.pop("modules"), "'modules' must map each adapted module's name"),
        (lambda r: r.update(modules=[[16, 16]]), "'modules' must map each adapted module's name"),
        (lambda r: r["modules"].update({"0": [16]}), r"module '0' with shape \[16\]; expected \[d_out, d_in\]"),
        (lambda r: r["modules"].update({"0": ["16", "16"]}), "module '0' with shape"),
        (lambda r: r["modules"].update({"0": [16, True]}), "module '0' with shape"),
        (lambda r: r["modules"].update({"0": [0, 16]}), "module '0' with shape"),
        (lambda r: r.update(modules_to_save="6"), "'modules_to_save' must be a list of module names"),
        (lambda r: r.update(modules_to_save=[6]), "'modules_to_save' must be a list of module names"),
    ],
)
def test_a_config_file_recording_nonsense_is_an_error_naming_the_file(tmp_path, change, message):
    save_mlp_adapter(tmp_path)
    edit_record(tmp_path, change)
    error = refused(tmp_path, message)
    assert str(tmp_path / CONFIG_NAME) in str(error)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("mor", "must be a JSON object, got str"),
        ({"rank": 2, "target_modules": ["q"]}, "has no 'method'"),
        ({"method": {"name": "lotr"}, "target_modules": ["q"]}, "Unknown adapter method"),
        ({"method": "lotr", "target_modules": ["q"], 3: "x"}, r"has no field\(s\) \[3\]"),
        ({"method": "lotr", "target_modules": ["q"], "rank": 10**400}, "too large"),
        ({"method": "mor", "target_modules": ["q"], "alpha": 10**400}, "alpha must be a finite number"),
        ({"method": "lotr", "target_modules": ["q"], "freeze_factors": "yes"}, "freeze_factors must be true or false"),
    ],
)
def test_from_dict_refuses_bad_data_with_rankshare_error(data, message):
    with pytest.raises(rs.RankshareError, match=message):
        rs.AdapterConfig.from_dict(data)


# -- checksums ----------------------------------------------------------------------------------------------


def test_a_config_edited_without_its_checksum_entry_removed_is_refused(tmp_path):
    save_mlp_adapter(tmp_path)
    path = tmp_path / CONFIG_NAME
    path.write_text(path.read_text().replace('"alpha": 8', '"alpha": 9'))
    refused(tmp_path, "does not match its own checksum .*delete its config_sha256 entry")


def test_a_config_edited_on_purpose_loads_as_edited(tmp_path):
    save_mlp_adapter(tmp_path)
    edit_record(tmp_path, lambda record: record["config"].update(alpha=2.0))
    assert load_mlp(tmp_path).adapter_config.scale == 2.0 / 4


def test_weights_from_another_save_are_refused(tmp_path):
    save_mlp_adapter(tmp_path / "one", seed=1)
    save_mlp_adapter(tmp_path / "two", seed=2)
    (tmp_path / "one" / WEIGHTS_NAME).write_bytes((tmp_path / "two" / WEIGHTS_NAME).read_bytes())
    refused(tmp_path / "one", "does not belong with the adapter_config.json beside it")


def test_files_saved_before_checksums_still_load(tmp_path):
    expected = save_mlp_adapter(tmp_path)
    edit_record(tmp_path, lambda record: record.pop("weights_sha256"))
    torch.testing.assert_close(run(load_mlp(tmp_path), MLP.inputs()), expected, rtol=0, atol=0)


# -- the base model -----------------------------------------------------------------------------------------


def test_a_recorded_module_that_is_not_linear_is_named(tmp_path):
    save_mlp_adapter(tmp_path)
    base = base_model(MLP)
    base[2] = nn.Tanh()
    with pytest.raises(rs.RankshareError, match="records '2' as a linear layer, but in this base model it is a Tanh"):
        load_mlp(tmp_path, base)
    assert not any(isinstance(m, rs.AdapterLayer) for m in base.modules())


def test_a_base_model_with_more_matching_modules_is_refused(tmp_path):
    two = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    rs.adapt(two, rs.LotrConfig(rank=2, target_modules=r"\d")).save_pretrained(tmp_path)
    three = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(rs.RankshareError, match=r"select 3 modules .* saved for 2: selected here only \['2'\]"):
        rs.AdaptedModel.from_pretrained(three, tmp_path)
    assert not any(isinstance(m, rs.AdapterLayer) for m in three.modules())
    assert all(p.requires_grad for p in three.parameters())


def test_loading_twice_into_one_base_model_says_so(tmp_path):
    save_mlp_adapter(tmp_path)
    base = base_model(MLP)
    load_mlp(tmp_path, base)
    with pytest.raises(rs.RankshareError, match="already has rankshare adapters"):
        load_mlp(tmp_path, base)


# -- tensors in the file ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("0.lora_A"), r"missing tensors \['0.lora_A'\]"),
        (lambda t: t.update(extra=torch.zeros(2)), r"unexpected tensors \['extra'\]"),
        (
            lambda t: t.update({"2.lora_B": torch.zeros(16, 5)}),
            r"'2.lora_B' .* has shape \(16, 5\), the model expects \(16, 4\)",
        ),
        (
            lambda t: t.update({"2.router": t["2.router"].long()}),
            "'2.router' .* stored as torch.int64, the model expects torch.float32",
        ),
        (lambda t: t.update({"0.lora_A": t["0.lora_A"] > 0}), "stored as torch.bool"),
        (lambda t: t["4.lora_B"].__setitem__((0, 0), math.nan), "'4.lora_B' .* holds NaN or inf"),
        (lambda t: t["6.weight"].__setitem__((0, 0), math.inf), "'6.weight' .* holds NaN or inf"),
    ],
)
def test_bad_tensors_are_refused_before_anything_is_copied(tmp_path, change, message):
    """The last cases sit after the head ``6`` in the file's order: a refused file must not have changed it."""
    save_mlp_adapter(tmp_path)
    rewrite_tensors(tmp_path, change)
    refused(tmp_path, message)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_precisions_load_cast_to_the_adapters_dtype(tmp_path, dtype):
    save_mlp_adapter(tmp_path)
    stored = {}

    def convert(tensors):
        for key in tensors:
            tensors[key] = stored[key] = tensors[key].to(dtype)

    rewrite_tensors(tmp_path, convert)
    loaded = load_mlp(tmp_path)
    for key, tensor in loaded.adapter_state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, stored[key].to(torch.float32)), key


def test_a_non_finite_adapter_is_not_saved_over_a_good_one(tmp_path):
    expected = save_mlp_adapter(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    model = rs.adapt(base_model(MLP), METHODS["mor"](MLP.targets), modules_to_save=MLP.modules_to_save)
    with torch.no_grad():
        model.adapter_layers()["2"].lora_B[0, 0] = math.inf
    with pytest.raises(rs.RankshareError, match="'2.lora_B' holds NaN or inf, so the adapter was not saved"):
        model.save_pretrained(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    torch.testing.assert_close(run(load_mlp(tmp_path), MLP.inputs()), expected, rtol=0, atol=0)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_saved_files_get_the_usual_permissions(tmp_path):
    save_mlp_adapter(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


# -- merging safely -----------------------------------------------------------------------------------------


def lotr_mlp(bad_layer: str | None = None) -> rs.AdaptedModel:
    model = rs.adapt(base_model(MLP), METHODS["lotr"](MLP.targets))
    randomise_adapters(model)
    if bad_layer is not None:
        with torch.no_grad():
            model.adapter_layers()[bad_layer].core[0, 0] = math.nan
    return model


def base_weights(model: rs.AdaptedModel) -> dict[str, torch.Tensor]:
    return {name: layer.base_layer.weight.clone() for name, layer in model.adapter_layers().items()}


def test_a_safe_layer_merge_refuses_a_non_finite_update_and_changes_nothing():
    layer = lotr_mlp(bad_layer="2").base_model[2]
    before = layer.base_layer.weight.clone()
    with pytest.raises(rs.RankshareError, match="16×16 adapter layer would put NaN or inf"):
        layer.merge(safe=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged
    layer.merge()  # the default keeps the old behaviour: no check
    assert layer.merged and not torch.isfinite(layer.base_layer.weight).all()


@pytest.mark.parametrize("merge", ["merge", "merge_and_unload"])
def test_a_safe_model_merge_names_the_bad_layer_and_leaves_every_weight_as_it_was(merge):
    model = lotr_mlp(bad_layer="4")  # the last adapted layer: "0" and "2" are fine and would merge first
    before = base_weights(model)
    with pytest.raises(rs.RankshareError, match="Adapter layer '4': Merging this .* would put NaN or inf"):
        getattr(model, merge)(safe=True)
    assert list(model.adapter_layers()) == ["0", "2", "4"]
    for name, layer in model.adapter_layers().items():
        assert torch.equal(layer.base_layer.weight, before[name]), name
        assert model.base_model.get_submodule(name).merged is None, name


def test_a_safe_merge_refuses_an_update_that_overflows_half_precision():
    model = rs.adapt(nn.Sequential(nn.Linear(4, 4)).half(), rs.LotrConfig(rank=2, target_modules=["0"]))
    with torch.no_grad():
        model.adapter_layers()["0"].core.fill_(1e6)  # finite in float32, beyond float16's 65504
    before = model.base_model[0].base_layer.weight.clone()
    with pytest.raises(rs.RankshareError, match="overflows torch.float16"):
        model.merge(safe=True)
    assert torch.equal(model.base_model[0].base_layer.weight, before)


def test_a_safe_merge_of_a_healthy_adapter_equals_the_plain_merge():
    plain, checked = lotr_mlp(), lotr_mlp()
    plain.merge()
    checked.merge(safe=True)
    for name, weight in base_weights(plain).items():
        assert torch.equal(weight, base_weights(checked)[name]), name
    mixture = rs.adapt(base_model(MLP), METHODS["mor"](MLP.targets))
    randomise_adapters(mixture)
    with torch.no_grad():
        for layer in mixture.adapter_layers().values():
            layer.router.zero_()
    expected = run(mixture, MLP.inputs())
    merged = mixture.merge_and_unload(gates=[1 / 3] * 3, safe=True)
    torch.testing.assert_close(run(merged, MLP.inputs()), expected, rtol=0, atol=1e-5)


# -- saves killed part-way ----------------------------------------------------------------------------------

# The saving process: loads each source adapter into a base of the right shape (its weights do not matter to
# what is saved), then saves into the target. ``hang_at`` stops it at one moment of the save, for the parent
# to kill it there; ``never`` saves the sources in turn, for ever, and is killed at whatever moment comes.
SAVER = r"""
import os, sys, time
from pathlib import Path

import torch
import rankshare as rs

width, hang_at, marker, target, *sources = sys.argv[1:]


def hang():
    Path(marker).touch()
    time.sleep(600)


if hang_at == "write":  # the first fsync is the new tensor file's: written in full, nothing renamed yet
    os.fsync = lambda handle: hang()
elif hang_at == "rename":  # after the tensor file's rename, before the config's
    rename = os.replace

    def rename_then_hang(source, destination):
        rename(source, destination)
        hang()

    os.replace = rename_then_hang

width = int(width)
base = lambda: torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, width))
models = [rs.AdaptedModel.from_pretrained(base(), source) for source in sources]
models[0].save_pretrained(target)
Path(marker).touch()
while True:
    for model in models:
        model.save_pretrained(target)
"""


def stack(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))


def save_stack_adapter(directory: Path, width: int, seed: int) -> torch.Tensor:
    model = rs.adapt(stack(width), rs.MorConfig(rank=min(width, 64), num_experts=4, target_modules=["0", "2"]))
    randomise_adapters(model, seed=seed)
    model.save_pretrained(directory)
    return run(model, {"input": torch.ones(3, width)})


def load_stack(directory: Path, width: int) -> torch.Tensor:
    return run(rs.AdaptedModel.from_pretrained(stack(width), directory), {"input": torch.ones(3, width)})


def kill_while_saving(width: int, hang_at: str, target: Path, *sources: Path, delay: float = 0.0) -> None:
    """Start the saver, wait until it reaches ``hang_at`` (plus ``delay``), and SIGKILL it: no cleanup runs."""
    marker = target.parent / f"{target.name}.reached"
    arguments = [str(width), hang_at, str(marker), str(target), *map(str, sources)]
    saver = subprocess.Popen([sys.executable, "-c", SAVER, *arguments])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert saver.poll() is None, "the saver ended before it could be killed"
            assert time.monotonic() < deadline, "the saver never reached the moment to kill it"
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        saver.kill()
        saver.wait()
    marker.unlink()


posix_only = pytest.mark.skipif(os.name != "posix", reason="kills with SIGKILL")


@posix_only
def test_a_save_killed_before_its_renames_leaves_the_old_adapter(tmp_path):
    target, new = tmp_path / "adapter", tmp_path / "new"
    old_outputs = save_stack_adapter(target, 16, seed=1)
    save_stack_adapter(new, 16, seed=2)
    old_files = {name: (target / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    kill_while_saving(16, "write", target, new)
    assert {name: (target / name).read_bytes() for name in old_files} == old_files
    assert any(p.name.startswith(f".{WEIGHTS_NAME}.") for p in target.iterdir())  # the save was cut off in the middle
    torch.testing.assert_close(load_stack(target, 16), old_outputs, rtol=0, atol=0)


@posix_only
def test_a_save_killed_between_its_renames_leaves_the_old_adapter(tmp_path):
    target, new = tmp_path / "adapter", tmp_path / "new"
    old_outputs = save_stack_adapter(target, 16, seed=1)
    new_outputs = save_stack_adapter(new, 16, seed=2)
    kill_while_saving(16, "rename", target, new)
    assert (target / WEIGHTS_NAME).read_bytes() == (new / WEIGHTS_NAME).read_bytes()  # new weights, old config
    torch.testing.assert_close(load_stack(target, 16), old_outputs, rtol=0, atol=0)
    rs.AdaptedModel.from_pretrained(stack(16), new).save_pretrained(target)  # the next save completes the switch
    torch.testing.assert_close(load_stack(target, 16), new_outputs, rtol=0, atol=0)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".tmp")) == [CONFIG_NAME, WEIGHTS_NAME]


@posix_only
def test_saves_killed_at_any_moment_load_one_adapter_or_are_refused(tmp_path):
    width = 1024  # about a megabyte of tensors, so that kills land at different moments of a save
    outputs = [save_stack_adapter(tmp_path / name, width, seed) for name, seed in (("a", 1), ("b", 2))]
    target = tmp_path / "adapter"
    for delay in (0.0, 0.05, 0.13):
        kill_while_saving(width, "never", target, tmp_path / "a", tmp_path / "b", delay=delay)
        loaded = load_stack(target, width)
        assert any(torch.equal(loaded, expected) for expected in outputs)
