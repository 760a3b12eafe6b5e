"""AdapterTrainer: transformers' Trainer whose checkpoints are adapter files, and which resumes from them."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch
from transformers import TrainerCallback, TrainingArguments

import rankshare as rs
from conftest import FAMILIES, METHODS, base_model
from rankshare.integrations import AdapterTrainer

BERT = FAMILIES["bert"]
STEPS, SAVE_EVERY = 6, 3


def examples(count: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (count, 6), generator=generator)
    labels = torch.randint(0, 3, (count,), generator=generator)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(count)]


def adapted_bert(method: str, adapter_seed: int = 0) -> rs.AdaptedModel:
    """The same pretrained weights every time; ``adapter_seed`` draws the adapter's initial tensors."""
    base = base_model(BERT)
    torch.manual_seed(adapter_seed)
    return rs.adapt(base, METHODS[method](BERT.targets), modules_to_save=BERT.modules_to_save)


def trainer(model, output_dir, callbacks=(), eval_dataset=None, **options) -> AdapterTrainer:
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, save_steps=SAVE_EVERY, per_device_train_batch_size=4,
        learning_rate=1e-2, seed=11, report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True, **options,
    )
    return AdapterTrainer(model=model, args=args, train_dataset=examples(), eval_dataset=eval_dataset,
                          callbacks=list(callbacks))


class StopAt(TrainerCallback):
    """Interrupts training after ``step``, as a killed job would, with the schedule of the full run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def adapter_tensors(model: rs.AdaptedModel) -> dict[str, torch.Tensor]:
    return {key: t.detach().clone() for key, t in model.adapter_state_dict().items()}


@pytest.mark.parametrize("method", ["lotr", "mor"])
def test_checkpoints_hold_only_the_adapter(method, tmp_path):
    model = adapted_bert(method)
    trainer(model, tmp_path).train()

    for step in (SAVE_EVERY, STEPS):
        checkpoint = tmp_path / f"checkpoint-{step}"
        assert (checkpoint / "adapter_config.json").is_file()
        assert not (checkpoint / "model.safetensors").exists() and not (checkpoint / "pytorch_model.bin").exists()
        weights = checkpoint / "adapter_model.safetensors"
        with open(weights, "rb") as f:
            header_length = struct.unpack("<Q", f.read(8))[0]
        adapter_numbers = sum(t.numel() for t in model.adapter_state_dict().values())
        assert weights.stat().st_size <= 8 + header_length + 4 * adapter_numbers
    # The last checkpoint holds the trained adapter, which from_pretrained restores.
    saved = safetensors.torch.load_file(tmp_path / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    for key, tensor in model.adapter_state_dict().items():
        torch.testing.assert_close(saved[key], tensor, rtol=0, atol=0)
    assert json.loads((tmp_path / f"checkpoint-{STEPS}" / "adapter_config.json").read_text())["method"] == method


@pytest.mark.parametrize("method", ["lotr", "mor"])
def test_resumed_run_ends_where_an_uninterrupted_run_ends(method, tmp_path):
    uninterrupted = adapted_bert(method)
    trainer(uninterrupted, tmp_path / "whole").train()

    interrupted = adapted_bert(method)
    trainer(interrupted, tmp_path / "parts", callbacks=[StopAt(SAVE_EVERY)]).train()
    assert not (tmp_path / "parts" / f"checkpoint-{STEPS}").exists()

    # Another adapter init: only the checkpoint can bring the resumed run back on track.
    resumed = adapted_bert(method, adapter_seed=99)
    checkpoint = tmp_path / "parts" / f"checkpoint-{SAVE_EVERY}"
    trainer(resumed, tmp_path / "parts").train(resume_from_checkpoint=str(checkpoint))

    expected, found = adapter_tensors(uninterrupted), adapter_tensors(resumed)
    assert found.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    initial = adapter_tensors(adapted_bert(method))
    assert any(not torch.allclose(expected[key], initial[key]) for key in expected)  # training did move the adapter


def test_best_checkpoint_is_loaded_at_the_end(tmp_path):
    model = adapted_bert("lotr")
    evaluations = []

    def earliest_is_best(prediction) -> dict:
        # A metric that makes the first evaluation the best, so that the best checkpoint is not the last state.
        assert prediction.label_ids is not None  # labels were found for the base model's forward
        evaluations.append(prediction)
        return {"order": len(evaluations)}

    run = trainer(model, tmp_path, eval_dataset=examples(8), eval_strategy="steps", eval_steps=SAVE_EVERY,
                  load_best_model_at_end=True, metric_for_best_model="order", greater_is_better=False)
    run.compute_metrics = earliest_is_best
    run.train()
    assert len(evaluations) == STEPS // SAVE_EVERY
    best = run.state.best_model_checkpoint
    assert best.endswith(f"checkpoint-{SAVE_EVERY}")
    saved = safetensors.torch.load_file(f"{best}/adapter_model.safetensors")
    for key, tensor in model.adapter_state_dict().items():
        torch.testing.assert_close(tensor, saved[key], rtol=0, atol=0)


def test_loading_another_adapters_checkpoint_is_refused_unchanged(tmp_path):
    rs.adapt(base_model(BERT), rs.LotrConfig(rank=2, target_modules=BERT.targets)).save_pretrained(tmp_path)
    model = adapted_bert("lotr")
    before = adapter_tensors(model)
    with pytest.raises(rs.RankshareError, match="another config or other modules"):
        model.load_adapter_weights(tmp_path)
    for key, tensor in model.adapter_state_dict().items():
        assert torch.equal(tensor, before[key])


def test_trainer_refuses_a_model_without_adapters(tmp_path):
    with pytest.raises(rs.RankshareError, match="AdaptedModel"):
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
        AdapterTrainer(model=base_model(BERT), args=args)
