"""compress_lora: a PEFT LoRA refitted as LoTR, checked against PEFT's own outputs and a dense reference residual."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch
import transformers
from peft.tuners.lora import LoraLayer

import rankshare as rs
from conftest import FAMILIES, base_model, run
from rankshare.targets import group_targets

BERT, LLAMA = FAMILIES["bert"], FAMILIES["llama"]


def peft_lora(family, folder: Path, rank: int = 2, seed: int = 1, **options) -> peft.PeftModel:
    """A PEFT LoRA of ``family``'s targets with random factors (PEFT starts lora_B at zero) and a random saved head,
    saved in ``folder``."""
    config = peft.LoraConfig(r=rank, lora_alpha=4 * rank, target_modules=family.targets,
                             modules_to_save=family.modules_to_save or None, fan_in_fan_out=family.name == "gpt2",
                             **options)
    model = peft.get_peft_model(base_model(family), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    model.eval().save_pretrained(folder)
    return model


def lora_layers(model: peft.PeftModel) -> dict[str, LoraLayer]:
    return {name: module for name, module in model.base_model.model.named_modules() if isinstance(module, LoraLayer)}


def peft_update(layer: LoraLayer) -> torch.Tensor:
    """PEFT's ΔW = s B A as (d_out, d_in), Conv1D (fan_in_fan_out) included."""
    return layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def lotr_update(layer: rs.LotrLayer) -> torch.Tensor:
    return layer.scale * layer.group.left @ layer.core @ layer.group.right.T


def dense_relative_error(lora: peft.PeftModel, model: rs.AdaptedModel, modules: tuple[str, ...]) -> float:
    """sqrt(Σ_l ‖ΔW_l − U G_l Vᵀ‖² / Σ_l ‖ΔW_l‖²), every update formed densely."""
    peft_layers, lotr_layers = lora_layers(lora), model.adapter_layers()
    residual = sum(float((peft_update(peft_layers[n]) - lotr_update(lotr_layers[n])).square().sum()) for n in modules)
    return math.sqrt(residual / sum(float(peft_update(peft_layers[n]).square().sum()) for n in modules))


@torch.no_grad()
def assert_outputs_equal(model: rs.AdaptedModel, lora: peft.PeftModel, family) -> None:
    expected = run(lora, family.inputs())
    torch.testing.assert_close(run(model.eval(), family.inputs()), expected, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        assert (run(model, family.inputs()) - expected).abs().max() > 1e-2  # the LoRA does change the outputs


@pytest.mark.parametrize("family_name", ["llama", "gpt2", "bert"])
def test_layers_on_one_basis_compress_exactly_and_smaller(tmp_path, family_name):
    """B_l = U M_l and A_l = N_l Vᵀ (rank 3 each, on one rank-2 basis per group): LoTR at rank 2 is exact."""
    family = FAMILIES[family_name]
    lora = peft_lora(family, tmp_path, rank=3)
    layers = lora_layers(lora)
    shapes = {name: tuple(peft_update(layer).shape) for name, layer in layers.items()}
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for names in group_targets(shapes, "by_name").values():
            d_out, d_in = shapes[names[0]]
            U, V = torch.randn(d_out, 2, generator=generator), torch.randn(d_in, 2, generator=generator)
            for name in names:
                layers[name].lora_B["default"].weight.copy_(0.3 * U @ torch.randn(2, 3, generator=generator))
                layers[name].lora_A["default"].weight.copy_(0.3 * torch.randn(3, 2, generator=generator) @ V.T)
    lora.save_pretrained(tmp_path)

    model, report = rs.compress_lora(base_model(family), tmp_path, rank=2)

    assert_outputs_equal(model, lora, family)
    assert sorted(report) == sorted(model.shared["default"])
    for fit in report.values():
        d_out, d_in = shapes[fit.modules[0]]
        L = len(fit.modules)
        assert fit.relative_error < 1e-6
        assert fit.lora_parameters == L * 3 * (d_in + d_out)
        assert fit.lotr_parameters == 2 * (d_in + d_out) + L * 2**2
        assert fit.parameter_ratio < 1
    head = sum(p.numel() for name in model.modules_to_save for p in model.get_submodule(name).current().parameters())
    assert model.num_trainable_parameters() == sum(fit.lotr_parameters for fit in report.values()) + head


@pytest.mark.parametrize("family_name", ["llama", "gpt2", "bert"])
def test_any_lora_is_reproduced_at_rank_layers_times_lora_rank(tmp_path, family_name):
    """Random factors, rank 2 on L = 3 layers: LoTR at rank L · 2 = 6 holds every update exactly."""
    family = FAMILIES[family_name]
    lora = peft_lora(family, tmp_path, rank=2)
    model, report = rs.compress_lora(base_model(family), tmp_path, rank=6)
    assert_outputs_equal(model, lora, family)
    assert all(fit.relative_error < 1e-6 for fit in report.values())
    peft_layers = lora_layers(lora)
    for name, layer in model.adapter_layers().items():
        torch.testing.assert_close(lotr_update(layer), peft_update(peft_layers[name]), rtol=0, atol=1e-6, msg=name)


def test_error_falls_with_rank_and_is_the_dense_residual(tmp_path):
    lora = peft_lora(LLAMA, tmp_path, rank=2)  # GQA: k_proj and v_proj are 16×32, q_proj 32×32
    errors: dict[str, list[float]] = {}
    for rank in range(1, 7):
        model, report = rs.compress_lora(base_model(LLAMA), tmp_path, rank=rank)
        for key, fit in report.items():
            assert fit.relative_error == pytest.approx(dense_relative_error(lora, model, fit.modules), abs=1e-5)
            errors.setdefault(key, []).append(fit.relative_error)
    assert len(errors) == 3
    for key, by_rank in errors.items():
        assert all(later <= earlier + 1e-9 for earlier, later in zip(by_rank, by_rank[1:])), key
        assert by_rank[0] > 0.5 > by_rank[3] > by_rank[-1], key


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
def test_rank_and_alpha_patterns_scale_each_module_as_peft_does(tmp_path, use_rslora):
    # q_proj has ranks 3, 2, 2 and k_proj 2, 1, 2; rank 8 exceeds both sums, so some directions are unused.
    lora = peft_lora(LLAMA, tmp_path, rank=2, use_rslora=use_rslora,
                     rank_pattern={"model.layers.0.self_attn.q_proj": 3, r"layers\.1\..*k_proj": 1},
                     alpha_pattern={"v_proj": 3, "model.layers.2.self_attn.q_proj": 20})
    ranks = {name: layer.r["default"] for name, layer in lora_layers(lora).items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 3 and ranks["model.layers.1.self_attn.k_proj"] == 1
    model, report = rs.compress_lora(base_model(LLAMA), tmp_path, rank=8)
    assert_outputs_equal(model, lora, LLAMA)
    assert all(fit.relative_error < 1e-6 for fit in report.values())


def test_by_shape_saves_loads_and_trains_as_any_lotr_adapter(tmp_path):
    lora = peft_lora(BERT, tmp_path / "lora")  # query and value, 32×32, and the classifier saved whole
    model, report = rs.compress_lora(base_model(BERT), tmp_path / "lora", rank=12, share="by_shape")
    assert list(report) == ["32x32"] and len(report["32x32"].modules) == 6
    assert_outputs_equal(model, lora, BERT)

    model.save_pretrained(tmp_path / "lotr")
    loaded = rs.AdaptedModel.from_pretrained(base_model(BERT), tmp_path / "lotr")
    assert_outputs_equal(loaded, lora, BERT)

    model.train()
    run(model, BERT.inputs()).square().sum().backward()
    group = model.shared["default"]["32x32"]
    trained = [group.left, group.right, *(layer.core for layer in model.adapter_layers().values()),
               model.get_submodule("classifier").weight]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_an_exported_lotr_adapter_compresses_back_to_itself(tmp_path):
    lotr = rs.adapt(base_model(LLAMA), rs.LotrConfig(rank=3, alpha=6, target_modules=LLAMA.targets))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for tensor in lotr.adapter_state_dict().values():
            tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator))
    rs.export_peft(lotr, tmp_path)
    model, report = rs.compress_lora(base_model(LLAMA), tmp_path, rank=3)
    assert all(fit.relative_error < 1e-6 for fit in report.values())
    for name, layer in model.adapter_layers().items():
        torch.testing.assert_close(lotr_update(layer), lotr_update(lotr.adapter_layers()[name]), rtol=0, atol=1e-6)


# -- refusals ---------------------------------------------------------------------------------------------------

def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(folder: Path, change) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    change(tensors)
    safetensors.torch.save_file(tensors, path)


QUERY_0 = "base_model.model.bert.encoder.layer.0.attention.self.query"


def rename_layer(tensors: dict) -> None:
    for key in [k for k in tensors if ".layer.2." in k]:
        tensors[key.replace(".layer.2.", ".layer.7.")] = tensors.pop(key)


REFUSALS = {
    "not LoRA": (lambda f: edit_config(f, peft_type="IA3"), {}, "not PEFT's LoRA"),
    "DoRA": (lambda f: peft_lora(BERT, f, use_dora=True), {}, "use_dora=True"),
    "trained biases": (lambda f: peft_lora(BERT, f, bias="lora_only"), {}, "bias='lora_only'"),
    "bias on lora_B": (lambda f: peft_lora(BERT, f, lora_bias=True), {}, "lora_bias=True"),
    "rank_pattern not the tensors'": (lambda f: edit_config(f, rank_pattern={"query": 4}), {}, "rank 4 .* rank 2"),
    "module the base lacks": (lambda f: edit_tensors(f, rename_layer), {}, "layer.7.attention.self.query.* lacks"),
    "module of another shape": (lambda f: edit_tensors(f, lambda t: t.update({
        f"{QUERY_0}.lora_B.weight": torch.zeros(40, 2)})), {}, "is 32×32 .* 40×32"),
    "factors that do not pair": (lambda f: edit_tensors(f, lambda t: t.update({
        f"{QUERY_0}.lora_A.weight": torch.zeros(3, 32)})), {}, "lora_A \\(r, d_in\\) and lora_B"),
    "NaN": (lambda f: edit_tensors(f, lambda t: t[f"{QUERY_0}.lora_A.weight"].fill_(math.nan)), {}, "NaN or inf"),
    "saved head incomplete": (lambda f: edit_tensors(f, lambda t: t.pop("base_model.model.classifier.bias")), {},
                              "missing \\['classifier.bias'\\]"),
    "head of another width": (lambda f: edit_tensors(f, lambda t: t.update({
        "base_model.model.classifier.weight": torch.zeros(3, 40)})), {}, "num_labels"),
    "no config": (lambda f: (f / "adapter_config.json").unlink(), {}, "No adapter_config.json"),
    "pickled weights": (lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"), {},
                        "adapter_model.bin, a pickle"),
    "rank above d": (lambda f: None, {"rank": 33}, "exceeds min\\(d_out, d_in\\) = 32"),
    "unknown share": (lambda f: None, {"share": "by_type"}, "share must be one of"),
}


@pytest.fixture(scope="module")
def bert_lora(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bert-lora")
    peft_lora(BERT, folder)
    return folder


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_folder_lotr_cannot_reproduce_is_refused_and_the_base_model_kept(bert_lora, tmp_path, case):
    spoil, arguments, message = REFUSALS[case]
    folder = tmp_path / "lora"
    shutil.copytree(bert_lora, folder)
    spoil(folder)
    base = base_model(BERT)
    before = {key: tensor.clone() for key, tensor in base.state_dict().items()}
    with pytest.raises(rs.RankshareError, match=message):
        rs.compress_lora(base, folder, **{"rank": 2, **arguments})
    assert not any(isinstance(module, (rs.AdaptedLinear, rs.SavedModule)) for module in base.modules())
    assert all(p.requires_grad for p in base.parameters())
    after = base.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[key], before[key]) for key in before)


# -- many LoRAs, one basis (compress_loras) ---------------------------------------------------------------------

def loras_on_one_basis(family, root: Path, ranks=(3, 2, 1), basis_rank: int = 2) -> dict[str, peft.PeftModel]:
    """One PEFT LoRA per task, ranks ``ranks``, whose updates all lie on one rank-``basis_rank`` basis per group:
    B_{t,l} = U M_{t,l} and A_{t,l} = N_{t,l} Vᵀ, with U and V shared by the group's layers and by every task."""
    loras, bases = {}, {}
    generator = torch.Generator().manual_seed(5)
    for task, rank in zip(("add", "sort", "count"), ranks):
        lora = peft_lora(family, root / task, rank=rank, seed=len(loras) + 1)
        layers = lora_layers(lora)
        shapes = {name: tuple(peft_update(layer).shape) for name, layer in layers.items()}
        with torch.no_grad():
            for key, names in group_targets(shapes, "by_name").items():
                d_out, d_in = shapes[names[0]]
                U, V = bases.setdefault(key, (torch.randn(d_out, basis_rank, generator=generator),
                                              torch.randn(d_in, basis_rank, generator=generator)))
                for name in names:
                    layers[name].lora_B["default"].weight.copy_(0.3 * U @ torch.randn(basis_rank, rank,
                                                                                      generator=generator))
                    layers[name].lora_A["default"].weight.copy_(0.3 * torch.randn(rank, basis_rank,
                                                                                  generator=generator) @ V.T)
        lora.save_pretrained(root / task)
        loras[task] = lora
    return loras


@pytest.mark.parametrize("family_name", ["llama", "gpt2", "bert"])
def test_loras_on_one_basis_come_back_exactly_and_serve_together(tmp_path, family_name):
    family = FAMILIES[family_name]
    loras = loras_on_one_basis(family, tmp_path)
    model, report = rs.compress_loras(base_model(family), {task: tmp_path / task for task in loras}, rank=2)
    assert sorted(model.adapter_configs) == ["add", "basis", "count", "sort"]
    assert all(model.basis_of(task) == "basis" for task in loras)
    for task, lora in loras.items():
        model.set_adapter(task)
        assert_outputs_equal(model, lora, family)
        assert report.task_errors[task] < 1e-6 and all(error < 1e-6 for error in report.errors[task].values())

    # Counts: the basis holds r (d_in + d_out) per group; a task its L r² cores and its head; a LoRA r_t (d_in + d_out)
    # per module and the same head.
    shapes = {name: tuple(peft_update(layer).shape) for name, layer in lora_layers(loras["add"]).items()}
    groups = group_targets(shapes, "by_name")
    head = {task: sum(p.numel() for name, p in lora.named_parameters() if "modules_to_save.default" in name)
            for task, lora in loras.items()}
    assert report.basis_parameters == sum(2 * sum(shapes[names[0]]) for names in groups.values())
    for task, rank in zip(("add", "sort", "count"), (3, 2, 1)):
        assert report.task_parameters[task] == len(shapes) * 2**2 + head[task]
        assert report.lora_parameters[task] == sum(rank * sum(shape) for shape in shapes.values()) + head[task]
    assert report.parameter_ratio == pytest.approx(report.total_parameters / sum(report.lora_parameters.values()))

    # One mixed batch: each row as its task alone.
    inputs = family.inputs()
    rows = inputs[next(iter(inputs))].shape[0]
    names = [("add", "sort", "count")[i % 3] for i in range(rows)]
    with torch.no_grad():
        mixed = run(model, {**inputs, "adapter_names": names})
        for task in loras:
            model.set_adapter(task)
            alone = run(model, inputs)
            chosen = [i for i, name in enumerate(names) if name == task]
            torch.testing.assert_close(mixed[chosen], alone[chosen], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family_name", ["llama", "gpt2", "bert"])
def test_a_lower_rank_is_approximate_and_its_error_never_grows_with_rank(tmp_path, family_name):
    family = FAMILIES[family_name]
    loras = {task: peft_lora(family, tmp_path / task, rank=2, seed=seed) for seed, task in enumerate(("a", "b"), 1)}
    folders = {task: tmp_path / task for task in loras}
    errors = []
    for rank in (1, 2, 4, 8, 12):  # 2 tasks x 3 layers x rank 2 = 12 holds every update of a group
        model, report = rs.compress_loras(base_model(family), folders, rank=rank)
        errors.append(report.task_errors)
        for task, lora in loras.items():
            model.set_adapter(task)
            peft_layers = lora_layers(lora)
            for key, modules in report.groups.items():
                residual = sum(float((peft_update(peft_layers[n]) - lotr_update(model.adapter_layers()[n])).square()
                                     .sum()) for n in modules)
                energy = sum(float(peft_update(peft_layers[n]).square().sum()) for n in modules)
                assert report.errors[task][key] == pytest.approx(math.sqrt(residual / energy), abs=1e-5)
    for task in loras:
        by_rank = [e[task] for e in errors]
        assert by_rank[0] > 0.3 and by_rank[-1] < 1e-6, by_rank
        assert all(later <= earlier + 1e-9 for earlier, later in zip(by_rank, by_rank[1:])), by_rank


def test_by_module_gives_each_module_a_basis_that_only_the_tasks_share(tmp_path):
    """Two random LoRAs of rank 2: a module's two updates span 4 directions, so one basis per module holds both
    exactly at rank 4, where the basis shared across the 3 layers (which needs 2 x 3 x 2 = 12) cannot."""
    loras = {task: peft_lora(LLAMA, tmp_path / task, rank=2, seed=seed) for seed, task in enumerate(("a", "b"), 1)}
    folders = {task: tmp_path / task for task in loras}
    model, report = rs.compress_loras(base_model(LLAMA), folders, rank=4, share="by_module")
    shapes = {name: tuple(peft_update(layer).shape) for name, layer in lora_layers(loras["a"]).items()}
    assert sorted(report.groups) == sorted(name.replace(".", "/") for name in shapes)
    for task, lora in loras.items():
        model.set_adapter(task)
        assert_outputs_equal(model, lora, LLAMA)
        assert report.task_errors[task] < 1e-6
    assert report.basis_parameters == sum(4 * sum(shape) for shape in shapes.values())
    assert report.task_parameters["a"] == len(shapes) * 4**2
    _, by_name = rs.compress_loras(base_model(LLAMA), folders, rank=4)
    assert all(by_name.task_errors[task] > 0.1 for task in loras)

    model.save_pretrained(tmp_path / "basis", "basis")
    model.save_pretrained(tmp_path / "b", "b")
    loaded = rs.AdaptedModel.from_pretrained(base_model(LLAMA), tmp_path / "basis", adapter_name="basis")
    loaded.load_adapter(tmp_path / "b", "b")
    loaded.set_adapter("b")
    assert_outputs_equal(loaded, loras["b"], LLAMA)


def test_compress_lora_is_compress_loras_with_one_task(tmp_path):
    peft_lora(LLAMA, tmp_path / "only", rank=2)
    single, report = rs.compress_lora(base_model(LLAMA), tmp_path / "only", rank=3)
    joint, joint_report = rs.compress_loras(base_model(LLAMA), {"only": tmp_path / "only"}, rank=3)
    for key, fit in report.items():
        assert fit.relative_error == pytest.approx(joint_report.errors["only"][key], abs=1e-9)
        torch.testing.assert_close(single.shared["default"][key].left, joint.shared["basis"][key].left)
    with torch.no_grad():
        torch.testing.assert_close(run(single, LLAMA.inputs()), run(joint, LLAMA.inputs()), rtol=1e-5, atol=1e-5)


def other_targets(folder: Path) -> None:
    edit_tensors(folder, lambda t: [t.pop(k) for k in [k for k in t if ".value.lora_" in k]])
    edit_config(folder, target_modules=["query"])


MANY_REFUSALS = {
    "other target modules": (other_targets, "LoRA 'second' .* adapts other modules than LoRA 'first'"),
    "another base model": (lambda f: edit_config(f, base_model_name_or_path="someone/other-bert"),
                           "LoRA 'second' .* trained on 'someone/other-bert'"),
    "DoRA": (lambda f: peft_lora(BERT, f, use_dora=True), "LoRA 'second': .*use_dora=True"),
    "a task named as the basis": (None, "name of the basis adapter"),
    "a task named as a module attribute": (None, "attribute of torch modules"),
}


@pytest.mark.parametrize("case", sorted(MANY_REFUSALS))
def test_loras_that_cannot_share_a_basis_are_refused_and_the_base_model_kept(bert_lora, tmp_path, case):
    spoil, message = MANY_REFUSALS[case]
    for task in ("first", "second"):
        shutil.copytree(bert_lora, tmp_path / task)
    edit_config(tmp_path / "first", base_model_name_or_path="someone/bert")
    edit_config(tmp_path / "second", base_model_name_or_path="someone/bert")
    if spoil:
        spoil(tmp_path / "second")
    folders = {"first": tmp_path / "first", "second": tmp_path / "second"}
    if case == "a task named as the basis":
        folders = {"basis": tmp_path / "first", "second": tmp_path / "second"}
    elif case == "a task named as a module attribute":
        folders = {"first": tmp_path / "first", "train": tmp_path / "second"}
    base = base_model(BERT)
    before = {key: tensor.clone() for key, tensor in base.state_dict().items()}
    with pytest.raises(rs.RankshareError, match=message):
        rs.compress_loras(base, folders, rank=2)
    assert not any(isinstance(module, (rs.AdaptedLinear, rs.SavedModule)) for module in base.modules())
    after = base.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize("first, second, alike", [
    ("/one/place/bert", "/another/place/bert/", True),  # the same model, moved
    ("someone/bert", "./models/bert", True),  # a hub model and its download into a folder of its name
    ("someone/bert", "another/bert", False),  # two hub ids
    ("/one/place/bert", "/one/place/other-bert", False),
])
def test_the_base_model_named_by_peft_is_compared_across_places(bert_lora, tmp_path, first, second, alike):
    for task, named in (("first", first), ("second", second)):
        shutil.copytree(bert_lora, tmp_path / task)
        edit_config(tmp_path / task, base_model_name_or_path=named)
    folders = {"first": tmp_path / "first", "second": tmp_path / "second"}
    if alike:
        _, report = rs.compress_loras(base_model(BERT), folders, rank=2)
        assert sorted(report.task_errors) == ["first", "second"]
    else:
        with pytest.raises(rs.RankshareError, match="LoRA 'second' .* trained on"):
            rs.compress_loras(base_model(BERT), folders, rank=2)


def test_each_task_keeps_its_own_head_even_over_another_label_set(tmp_path):
    """News has 5 topics, sentiment 3 classes: one base model serves both, each adapter with its own head."""
    three = peft_lora(BERT, tmp_path / "three", rank=2, seed=1)
    bert = base_model(BERT).config.to_dict()
    bert.pop("id2label"), bert.pop("label2id")
    torch.manual_seed(0)  # the same encoder as base_model(BERT); a classifier over 5 labels
    five_labels = transformers.BertForSequenceClassification(transformers.BertConfig(**{**bert, "num_labels": 5}))
    config = peft.LoraConfig(r=2, lora_alpha=8, target_modules=BERT.targets, modules_to_save=["classifier"])
    five = peft.get_peft_model(five_labels.eval(), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in five.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    five.eval().save_pretrained(tmp_path / "five")
    model, report = rs.compress_loras(base_model(BERT), {"three": tmp_path / "three", "five": tmp_path / "five"},
                                      rank=12)  # 2 tasks x 3 layers x rank 2: exact
    for task, lora in (("three", three), ("five", five)):
        model.set_adapter(task)
        with torch.no_grad():
            torch.testing.assert_close(run(model, BERT.inputs()), run(lora, BERT.inputs()), rtol=1e-5, atol=1e-5)
    assert report.task_parameters["five"] - report.task_parameters["three"] == 2 * (32 + 1)  # two more labels
