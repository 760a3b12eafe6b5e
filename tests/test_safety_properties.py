"""Properties over many generated cases: configs, layer shapes, and damaged adapter files.

- A valid config survives ``to_dict`` → JSON → ``from_dict``; an invalid one raises RankshareError, nothing else.
- Any small stack of linear layers round-trips through save and load with identical outputs, and its
  trainable count is the closed form in the methods' docstrings.
- A damaged adapter file either loads to exactly the saved outputs (the damage touched nothing that
  matters) or raises RankshareError; a failed load leaves the base model as it was.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rankshare as rs
from conftest import FAMILIES, METHODS, base_model, randomise_adapters, run

# Modest example counts keep the file quick; no example database (failures print their example instead).
PROPERTY = settings(max_examples=40, deadline=None, database=None)

LARGEST_SIZE = 2**31 - 1  # the config's bound on rank and num_experts

# -- configs ------------------------------------------------------------------------------------------------

module_names = st.text(alphabet="abcdefghij_0123456789.", min_size=1, max_size=12)
regexes = st.lists(module_names, min_size=1, max_size=3).map(lambda names: "|".join(f".*{re.escape(n)}" for n in names))
finite_alphas = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-10**6, 10**6))
sizes = st.integers(1, LARGEST_SIZE)

COMMON_FIELDS = {"rank": sizes, "alpha": st.one_of(st.none(), finite_alphas)}
METHOD_FIELDS = {
    "lotr": {
        "share": st.sampled_from(["by_name", "by_shape", "by_module"]),
        "init": st.sampled_from(["random", "tucker"]),
        "freeze_factors": st.booleans(),
    },
    "mor": {"num_experts": sizes},
    "moelora": {"num_experts": sizes},
}


def valid_config_dicts(method: str) -> st.SearchStrategy[dict]:
    targets = st.one_of(st.lists(module_names, min_size=1, max_size=4), regexes)
    required = {"method": st.just(method), "target_modules": targets}
    return st.fixed_dictionaries(required, optional={**COMMON_FIELDS, **METHOD_FIELDS[method]})


any_valid_config_dict = st.sampled_from(sorted(METHOD_FIELDS)).flatmap(valid_config_dicts)

keys = st.text(max_size=6)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), keys),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=6,
)


def _is_size(value) -> bool:
    return type(value) is int and 1 <= value <= LARGEST_SIZE


def _is_finite_alpha(value) -> bool:
    if value is None:
        return True
    if type(value) not in (int, float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _is_valid_targets(value) -> bool:
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error:
            return False
        return bool(value)
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


VALID = {
    "rank": _is_size,
    "num_experts": _is_size,
    "alpha": _is_finite_alpha,
    "target_modules": _is_valid_targets,
    "share": lambda v: v in ("by_name", "by_shape", "by_module"),
    "init": lambda v: v in ("random", "tucker"),
    "freeze_factors": lambda v: isinstance(v, bool),
}
awkward_values = st.one_of(
    json_values,
    st.integers(-(10**400), 10**400),
    st.sampled_from([0, -1, 2**31, 10**400, True, False, math.nan, math.inf, -math.inf, "8", 8.0, "(", "*", "", [""]]),
)


@st.composite
def invalid_config_dicts(draw) -> object:
    """A valid config dict with exactly one thing wrong with it (or not a dict at all)."""
    data = draw(any_valid_config_dict)
    fault = draw(st.sampled_from(["field", "method", "no_method", "unknown_field", "no_targets", "not_a_dict"]))
    if fault == "field":
        name = draw(st.sampled_from(["rank", "alpha", "target_modules", *METHOD_FIELDS[data["method"]]]))
        data[name] = draw(awkward_values.filter(lambda v: not VALID[name](v)))
    elif fault == "method":
        data["method"] = draw(json_values.filter(lambda v: not (isinstance(v, str) and v in METHOD_FIELDS)))
    elif fault == "no_method":
        del data["method"]
    elif fault == "unknown_field":
        data[draw(keys.filter(lambda k: k not in VALID and k != "method"))] = draw(json_values)
    elif fault == "no_targets":
        del data["target_modules"]
    else:
        return draw(json_values.filter(lambda v: not isinstance(v, dict)))
    return data


@PROPERTY
@given(any_valid_config_dict)
def test_valid_configs_round_trip_through_json(data):
    config = rs.AdapterConfig.from_dict(data)
    text = json.dumps(config.to_dict(), allow_nan=False)
    assert rs.AdapterConfig.from_dict(json.loads(text)) == config
    assert config.to_dict() == json.loads(text)
    assert math.isfinite(config.scale)


@PROPERTY
@given(invalid_config_dicts())
def test_invalid_configs_raise_rankshare_error_only(data):
    with pytest.raises(rs.RankshareError):
        rs.AdapterConfig.from_dict(data)


@PROPERTY
@given(st.fixed_dictionaries({"method": st.sampled_from(["lotr", "mor", "moelora"])}, optional={
    name: json_values for name in ["rank", "alpha", "target_modules", "share", "init", "freeze_factors", "num_experts"]
}))
def test_any_json_object_gives_a_config_or_a_rankshare_error(data):
    try:
        rs.AdapterConfig.from_dict(data)
    except rs.RankshareError:
        pass


# -- shapes -------------------------------------------------------------------------------------------------


class Parallel(nn.Module):
    """``count`` linear layers of one shape applied side by side: the smallest model where LoTR shares factors."""

    def __init__(self, d_in: int, d_out: int, count: int, bias: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out, bias=bias) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([layer(x) for layer in self.layers])  # (L, n, d_out)


@st.composite
def adapted_shapes(draw) -> dict:
    method = draw(st.sampled_from(["lotr", "mor", "moelora"]))
    d_in, d_out, count = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 3))
    rank = draw(st.integers(1, min(d_in, d_out) if method == "lotr" else 6))
    experts = draw(st.integers(1, 4))
    return {"method": method, "d_in": d_in, "d_out": d_out, "count": count, "rank": rank, "experts": experts,
            "bias": draw(st.booleans()), "alpha": draw(st.floats(0.25, 64))}


def closed_form_count(method: str, d_in: int, d_out: int, count: int, rank: int, experts: int) -> int:
    """Trainable parameters from the methods' docstrings (one LoTR group: the layers share a masked name and shape)."""
    if method == "lotr":
        return rank * (d_in + d_out) + count * rank**2
    if method == "mor":
        return count * (rank * (d_in + d_out) + experts * (rank + d_out) + experts * d_in)
    return count * (experts * rank * (d_in + d_out) + experts * d_in)


@PROPERTY
@given(adapted_shapes(), st.integers(0, 2**16))
def test_any_shape_round_trips_with_closed_form_counts(shape, seed):
    method, d_in, d_out, count = shape["method"], shape["d_in"], shape["d_out"], shape["count"]
    rank, experts = shape["rank"], shape["experts"]
    torch.manual_seed(seed)
    base = Parallel(d_in, d_out, count, shape["bias"])
    pristine = {k: v.clone() for k, v in base.state_dict().items()}
    config = (rs.LotrConfig(rank=rank, alpha=shape["alpha"], target_modules=["layers.0", "layers.1", "layers.2"])
              if method == "lotr" else
              {"mor": rs.MorConfig, "moelora": rs.MoeLoraConfig}[method](
                  rank=rank, num_experts=experts, alpha=shape["alpha"], target_modules=r"layers\.\d"))
    model = rs.adapt(base, config)
    randomise_adapters(model, seed=seed)
    expected_count = closed_form_count(method, d_in, d_out, count, rank, experts)
    assert model.num_trainable_parameters() == expected_count
    x = torch.randn(5, d_in, generator=torch.Generator().manual_seed(seed))
    expected = model(x)

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        weights = Path(directory) / "adapter_model.safetensors"
        header_length = int.from_bytes(weights.read_bytes()[:8], "little")
        assert weights.stat().st_size == 8 + header_length + 4 * expected_count  # each shared factor once
        torch.manual_seed(seed + 1)
        fresh = Parallel(d_in, d_out, count, shape["bias"])
        fresh.load_state_dict(pristine)
        loaded = rs.AdaptedModel.from_pretrained(fresh, directory, is_trainable=True)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert loaded.num_trainable_parameters() == expected_count


# -- damaged files ------------------------------------------------------------------------------------------

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module", params=["lotr", "mor"])
def saved(request, tmp_path_factory) -> dict:
    """One saved adapter (with a trained head) and the outputs it must reproduce."""
    family = FAMILIES["mlp"]
    model = rs.adapt(base_model(family), METHODS[request.param](family.targets), modules_to_save=family.modules_to_save)
    randomise_adapters(model)
    with torch.no_grad():
        model.base_model[6].weight.add_(1.0)
    directory = tmp_path_factory.mktemp(f"saved_{request.param}")
    model.save_pretrained(directory)
    return {"directory": directory, "expected": run(model, family.inputs()),
            "files": {name: (directory / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}}


@st.composite
def damaged(draw, original: bytes) -> bytes:
    """``original`` with one flipped byte, a cut, a few inserted bytes, or (in text) one digit changed."""
    kind = draw(st.sampled_from(["flip", "flip_near_start", "truncate", "insert", "digit"]))
    if kind in ("flip", "flip_near_start"):
        at = draw(st.integers(0, len(original) - 1 if kind == "flip" else min(len(original) - 1, 300)))
        return original[:at] + bytes([original[at] ^ draw(st.integers(1, 255))]) + original[at + 1:]
    if kind == "truncate":
        return original[: draw(st.integers(0, len(original) - 1))]
    if kind == "insert":
        at = draw(st.integers(0, len(original)))
        return original[:at] + draw(st.binary(min_size=1, max_size=8)) + original[at:]
    digits = [i for i, byte in enumerate(original) if chr(byte).isdigit()]
    at = draw(st.sampled_from(digits))
    digit = draw(st.sampled_from([d for d in b"0123456789" if d != original[at]]))
    return original[:at] + bytes([digit]) + original[at + 1:]


@PROPERTY
@given(data=st.data())
def test_a_damaged_file_loads_exactly_or_raises_rankshare_error(saved, data):
    family = FAMILIES["mlp"]
    name = data.draw(st.sampled_from([CONFIG_NAME, WEIGHTS_NAME]))
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        for file_name, content in saved["files"].items():
            (directory / file_name).write_bytes(content)
        (directory / name).write_bytes(data.draw(damaged(saved["files"][name])))
        base = base_model(family)
        pristine = {k: v.clone() for k, v in base.state_dict().items()}
        try:
            loaded = rs.AdaptedModel.from_pretrained(base, directory)
        except rs.RankshareError:
            assert not any(isinstance(m, rs.AdapterLayer) for m in base.modules())  # a failed load changes nothing
            for key, value in base.state_dict().items():
                assert torch.equal(value, pristine[key]), key
            return
    torch.testing.assert_close(run(loaded, family.inputs()), saved["expected"], rtol=0, atol=0)


def test_saved_fixture_files_are_what_the_loader_reads(saved, tmp_path):
    """Guards the property above: undamaged copies of the files load to the saved outputs."""
    for name, content in saved["files"].items():
        (tmp_path / name).write_bytes(content)
    loaded = rs.AdaptedModel.from_pretrained(base_model(FAMILIES["mlp"]), tmp_path)
    torch.testing.assert_close(run(loaded, FAMILIES["mlp"].inputs()), saved["expected"], rtol=0, atol=0)
