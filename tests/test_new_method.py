"""A method defined in this file alone — plain LoRA on rankshare's own AdapterLayer — is registered, planned
at a budget, trained by ``rankshare train``, saved, loaded, evaluated and merged: no other file knows it.

Also: methods that another installed package declares under the entry-point group ``rankshare.methods``.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass, field, replace

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForSequenceClassification

import rankshare as rs
from rankshare.config import unregister
from test_cli import cli, common, topics_csv  # noqa: F401 (a fixture)


class PlainLoraLayer(rs.AdapterLayer):
    """ΔW = s · B A; A (r, d_in) uniform or normal, B (d_out, r) zero."""

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, a_init: str) -> None:
        super().__init__(base_layer, scale)
        a = torch.empty(rank, self.in_features, **self.factory)
        if a_init == "normal":
            nn.init.normal_(a, std=1 / math.sqrt(self.in_features))
        else:
            nn.init.uniform_(a, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **self.factory))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ (self.scale * self.lora_A).T) @ self.lora_B.T

    def lora_factors(self, gates=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_B, self.scale * self.lora_A


@dataclass
class PlainLoraConfig(rs.AdapterConfig):
    method = "plainlora"
    title = "plain LoRA"
    learning_rate = 2e-2

    a_init: str = field(default="uniform", metadata={"choices": ("uniform", "normal"), "help": "init of A"})

    def create_adapters(self, targets):
        return {name: PlainLoraLayer(base, self.rank, self.scale, self.a_init) for name, base in targets.items()}, {}

    def num_trainable_parameters(self, shapes):
        return sum(self.rank * (d_in + d_out) for d_out, d_in in shapes.values())


@pytest.fixture
def plain_lora():
    rs.register(PlainLoraConfig)
    yield PlainLoraConfig
    unregister("plainlora")


def test_a_method_from_one_file_goes_through_every_stage(plain_lora, tiny_bert, topics_csv, tmp_path, capsys):  # noqa: F811
    assert rs.methods()["plainlora"] is PlainLoraConfig
    # Planned: 4 targets of 32 × 32 (2 layers, query and value) at 256 per rank: 800 is rank 3 (768, −4.0 %).
    assert cli("compare", "--dry-run", "--methods", "plainlora,lotr", "--budget", 800, "--model", tiny_bert) == 0
    printed = capsys.readouterr().out
    assert "plainlora: rank 3 gives 768 (−4.0 % of budget)" in printed and "lotr: rank" in printed

    out = tmp_path / "run"
    assert cli("train", "--method", "plainlora", "--a-init", "normal", "--budget", 800, "--max-steps", 6,
               *common(tiny_bert, topics_csv), "--out", out) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["method"] == "plainlora" and record["rank"] == 3
    assert record["trainable_parameters"]["adapter"] == 768
    assert record["config"]["adapter"]["a_init"] == "normal"
    assert record["config"]["learning_rate"] == 2e-2  # the method's own default rate
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["config"] == {"method": "plainlora", "rank": 3, "target_modules": ["query", "value"], "alpha": None,
                               "a_init": "normal"}

    capsys.readouterr()
    assert cli("eval", "--adapter", out, "--quiet") == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["test"] == record["metrics"]["test"]

    assert cli("merge", "--adapter", out, "--out", tmp_path / "refused", "--gates", "0.5,0.5") == 2
    assert "merges without it" in capsys.readouterr().err
    merged = tmp_path / "merged"
    assert cli("merge", "--adapter", out, "--out", merged) == 0
    from rankshare.finetune.trained import load_trained

    adapted, *_ = load_trained(out, "cpu")
    layers = adapted.adapter_layers()
    assert len(layers) == 4 and all(isinstance(layer, PlainLoraLayer) for layer in layers.values())
    assert any(layer.lora_B.abs().sum() > 0 for layer in layers.values())  # trained away from ΔW = 0
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    ids = torch.randint(0, 30000, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    # lora_factors alone also gives the export: PEFT computes what the adapter computes.
    assert cli("export", "--adapter", out, "--out", tmp_path / "peft") == 0
    exported = PeftModel.from_pretrained(load_trained(out, "cpu")[0].unload(), tmp_path / "peft")  # the run's base
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(input_ids=ids).logits, adapted(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_an_option_of_no_chosen_method_is_refused(plain_lora, tiny_bert, capsys):
    assert cli("train", "--method", "lotr", "--a-init", "normal", "--dry-run", "--model", tiny_bert) == 2
    assert "--a-init is an option of plainlora, not of lotr" in capsys.readouterr().err


def test_entry_point_methods_are_found(tmp_path, monkeypatch):
    """A package that declares ``[rankshare.methods] plainlora2 = module:Class`` shows up in rankshare.methods()."""
    (tmp_path / "third_party_method.py").write_text(
        "from dataclasses import dataclass\n"
        "from test_new_method import PlainLoraConfig\n\n"
        "@dataclass\n"
        "class OtherLora(PlainLoraConfig):\n"
        "    method = 'plainlora2'\n"
    )
    info = tmp_path / "third_party_method-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-method\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[rankshare.methods]\nplainlora2 = third_party_method:OtherLora\n"
                                           "broken = third_party_method:Missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(rs.config, "_entry_points_read", False)  # this process has read them already
    try:
        with pytest.warns(UserWarning, match="'broken'.*could not be loaded"):
            found = rs.methods()
        assert found["plainlora2"].__name__ == "OtherLora" and "broken" not in found
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the broken one again
            config = rs.AdapterConfig.from_dict({"method": "plainlora2", "rank": 2, "target_modules": ["x"]})
        assert type(config).__name__ == "OtherLora"
    finally:
        unregister("plainlora2")
        sys.modules.pop("third_party_method", None)


def test_a_method_must_implement_the_interface():
    @dataclass
    class Incomplete(rs.AdapterConfig):
        method = "incomplete"

        def create_adapters(self, targets):
            return {}, {}

    with pytest.raises(rs.RankshareError, match="does not implement num_trainable_parameters"):
        rs.register(Incomplete)
    with pytest.raises(rs.RankshareError, match="already registered"):
        rs.register(type("LotrConfig2", (rs.LotrConfig,), {"method": "lotr"}))
    assert "incomplete" not in rs.methods()


def test_option_types_reach_the_command_line(recwarn):
    """Floats parse as floats, integers honour their "min", booleans can be switched both ways; an option that
    clashes with one of rankshare's own is left off the command line with a warning, not a traceback."""
    from rankshare.cli import build_parser

    @dataclass
    class Options(PlainLoraConfig):
        method = "plainlora-options"
        dropout: float = 0.0
        offset: int = 0
        bias: bool = True
        seed: str = "clash"

    rs.register(Options)
    try:
        assert Options(target_modules=["x"]).offset == 0  # 0 is a valid value: the default "min" is 0
        with pytest.raises(rs.RankshareError, match="dropout must be a finite number"):
            Options(target_modules=["x"], dropout=float("nan"))
        args = build_parser().parse_args(["train", "--method", "plainlora-options", "--dropout", "0.1",
                                          "--offset", "0", "--no-bias"])
        given = [getattr(args, f"method_option:{name}") for name in ("dropout", "offset", "bias")]
        assert (*given, args.seed) == (0.1, 0, False, 0)
        assert not hasattr(args, "method_option:seed")  # the clash left rankshare's own --seed alone
        assert any("--seed of plainlora-options clashes" in str(w.message) for w in recwarn)
    finally:
        unregister("plainlora-options")


class SharedUpLayer(rs.AdapterLayer):
    """ΔW_l = s · B A_l with B (d_out, r) owned once by the adapter that is the basis, A_l (r, d_in) per layer."""

    def __init__(self, base_layer: nn.Module, up: nn.Module, rank: int, scale: float) -> None:
        super().__init__(base_layer, scale)
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, **self.factory))
        object.__setattr__(self, "up", up)  # owned by the model, once

    def shared_modules(self) -> list[nn.Module]:
        return [self.up]

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ (self.scale * self.lora_A).T) @ self.up.weight.T

    def lora_factors(self, gates=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.up.weight, self.scale * self.lora_A


@dataclass
class SharedUpConfig(rs.AdapterConfig):
    """A second method with a basis, whose basis field has another name than LoTR's and ties only rank and targets."""

    method = "sharedup"
    title = "shared-up LoRA"
    uses_a_basis = True

    up_from: str | None = field(default=None, metadata={"option": False})

    def basis_name(self):
        return self.up_from

    def on_basis(self, basis):
        return replace(self, up_from=basis)

    def basis_options(self):
        return {"rank": self.rank, "target_modules": self.target_modules}

    def create_adapters(self, targets, basis=None):
        def key(base):
            return "x".join(map(str, rs.layer.linear_shape(base)))

        ups = basis if self.up_from else {}
        for base in targets.values():
            if key(base) not in ups:
                d_out = rs.layer.linear_shape(base)[0]
                ups[key(base)] = nn.Linear(self.rank, d_out, bias=False)
        layers = {name: SharedUpLayer(base, ups[key(base)], self.rank, self.scale) for name, base in targets.items()}
        return layers, ({} if self.up_from else ups)

    def num_trainable_parameters(self, shapes):
        ups = {} if self.up_from else {shape: shape[0] * self.rank for shape in shapes.values()}
        return sum(self.rank * d_in for _, d_in in shapes.values()) + sum(ups.values())


def test_a_second_method_with_a_basis_trains_on_one_through_the_command_line(tiny_bert, topics_csv, tmp_path):  # noqa: F811
    """Nothing outside this file knows how SharedUpConfig names its basis or what it ties to it."""
    rs.register(SharedUpConfig)
    try:
        basis, task = tmp_path / "basis", tmp_path / "task"
        assert cli("train", "--method", "sharedup", "--rank", 2, "--max-steps", 4, *common(tiny_bert, topics_csv),
                   "--out", basis) == 0
        assert cli("train", "--method", "sharedup", "--basis", basis, "--max-steps", 4, "--data", topics_csv,
                   "--text-column", "body", "--label-column", "topic", "--max-length", 16, "--batch-size", 8,
                   "--quiet", "--out", task) == 0
        assert cli("train", "--method", "sharedup", "--basis", basis, "--rank", 3, "--dry-run") == 2
        record = json.loads((task / "metrics.json").read_text())
        assert record["config"]["adapter"]["up_from"] == "basis" and record["rank"] == 2
        assert record["trainable_parameters"]["adapter"] == 2 * 32 * 4  # A_l only: 4 layers of d_in 32 at rank 2
        assert cli("eval", "--adapter", task, "--quiet") == 0
    finally:
        unregister("sharedup")
