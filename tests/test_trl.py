"""AdapterSFTTrainer: TRL's SFTTrainer on a rankshare model; checkpoints are adapter files, and resuming is exact.

A tiny LLaMA (built from a config) and a word-level tokenizer over a small vocabulary, both made here, so nothing
is downloaded. The task: a prompt of three words, a completion of the same words reversed.
"""

from __future__ import annotations

import json
import struct

import pytest

pytest.importorskip("trl")

import huggingface_hub.constants
import safetensors.torch
import torch
import torch.nn.functional as F
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import SFTConfig

import rankshare as rs
from conftest import randomise_adapters
from rankshare.sft import AdapterSFTTrainer

WORDS = [f"w{i}" for i in range(12)]
VOCAB = ["<pad>", "</s>", "<unk>", "<user>", "<assistant>", *WORDS]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)
TARGETS = ["q_proj", "v_proj"]
CONFIGS = {
    "lotr": lambda: rs.LotrConfig(rank=4, alpha=8, target_modules=TARGETS),
    "mor": lambda: rs.MorConfig(rank=4, num_experts=3, alpha=8, target_modules=TARGETS),
}
STEPS, SAVE_EVERY = 4, 2


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    """TRL reports each trainer it builds to the Hub unless telemetry is off; keep the tests off the network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer that adds no special tokens, with a chat template; a new one each time (TRL sets its
    pad token)."""
    words = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def pairs(count: int = 16) -> list[tuple[str, str]]:
    generator = torch.Generator().manual_seed(3)
    picks = torch.randint(0, len(WORDS), (count, 3), generator=generator).tolist()
    return [(" ".join(WORDS[i] for i in row), " ".join(WORDS[i] for i in reversed(row))) for row in picks]


def prompt_completion() -> Dataset:
    """TRL's prompt-completion format; the completion starts with a space, since TRL joins the two strings."""
    prompts, completions = zip(*pairs())
    return Dataset.from_dict({"prompt": list(prompts), "completion": [f" {c} " for c in completions]})


def conversations() -> Dataset:
    return Dataset.from_dict({"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                                           for p, c in pairs()]})


DATASETS = {"prompt_completion": prompt_completion, "messages": conversations}


def llama() -> LlamaForCausalLM:
    """The same weights every time: 10× the usual init's, so that the output is not near uniform and a few steps on
    q and v move the loss."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return LlamaForCausalLM(config)


def adapted_llama(method: str, adapter_seed: int = 0, modules_to_save: list[str] | None = None) -> rs.AdaptedModel:
    """``adapter_seed`` draws the adapter's initial tensors."""
    base = llama()
    torch.manual_seed(adapter_seed)
    return rs.adapt(base, CONFIGS[method](), modules_to_save=modules_to_save)


def trainer(model, output_dir, dataset=None, callbacks=(), **options) -> AdapterSFTTrainer:
    # SFTConfig's defaults otherwise: gradient checkpointing on, completion-only loss for prompt-completion data.
    settings = dict(max_steps=STEPS, save_steps=SAVE_EVERY, per_device_train_batch_size=4, learning_rate=3e-2, seed=11,
                    report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                    max_length=32)
    args = SFTConfig(output_dir=str(output_dir), **{**settings, **options})
    return AdapterSFTTrainer(model=model, args=args, train_dataset=dataset if dataset is not None else
                             prompt_completion(), processing_class=tokenizer(), callbacks=list(callbacks))


class StopAt(TrainerCallback):
    """Interrupts training after ``step``, as a killed job would, with the schedule of the full run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def adapter_tensors(model: rs.AdaptedModel) -> dict[str, torch.Tensor]:
    return {key: t.detach().clone() for key, t in model.adapter_state_dict().items()}


def frozen_tensors(model: rs.AdaptedModel) -> dict[str, torch.Tensor]:
    return {key: p.detach().clone() for key, p in model.named_parameters() if not p.requires_grad}


# Each method once and each format once (the format is TRL's business, the method rankshare's): fewer slow runs. The
# LM head trained whole is read by TRL's fused head through the SavedModule that holds it.
@pytest.mark.parametrize(("method", "data", "modules_to_save"),
                         [("lotr", "messages", None), ("mor", "prompt_completion", ["lm_head"])])
def test_sft_trains_the_adapter_into_checkpoints_of_adapter_files(method, data, modules_to_save, tmp_path):
    model = adapted_llama(method, modules_to_save=modules_to_save)
    adapter_before, frozen_before = adapter_tensors(model), frozen_tensors(model)
    run = trainer(model, tmp_path, DATASETS[data]())
    loss_before = run.evaluate(DATASETS[data]())["eval_loss"]
    run.train()
    loss_after = run.evaluate(DATASETS[data]())["eval_loss"]

    assert loss_after < loss_before - 0.1, (loss_before, loss_after)
    after = adapter_tensors(model)
    assert after.keys() == adapter_before.keys()
    assert any(not torch.equal(after[key], adapter_before[key]) for key in after)
    for module in modules_to_save or []:
        assert any(key.startswith(module) and not torch.equal(after[key], adapter_before[key]) for key in after)
    for key, tensor in frozen_tensors(model).items():
        assert torch.equal(tensor, frozen_before[key]), key  # the base model did not move

    adapter_numbers = sum(t.numel() for t in after.values())
    for step in (SAVE_EVERY, STEPS):
        checkpoint = tmp_path / f"checkpoint-{step}"
        assert (checkpoint / "adapter_config.json").is_file()
        assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == ["adapter_model.safetensors"]
        assert not list(checkpoint.glob("pytorch_model*")) and not list(checkpoint.glob("model*.safetensors*"))
        weights = checkpoint / "adapter_model.safetensors"
        with open(weights, "rb") as f:
            header_length = struct.unpack("<Q", f.read(8))[0]
        assert weights.stat().st_size <= 8 + header_length + 4 * adapter_numbers  # float32 adapter tensors only
    last = tmp_path / f"checkpoint-{STEPS}"
    saved = safetensors.torch.load_file(last / "adapter_model.safetensors")
    assert saved.keys() == after.keys()
    for key, tensor in after.items():
        assert torch.equal(saved[key], tensor), key
    assert json.loads((last / "adapter_config.json").read_text())["method"] == method


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_resumed_run_ends_exactly_where_an_uninterrupted_run_ends(method, tmp_path):
    uninterrupted = adapted_llama(method)
    trainer(uninterrupted, tmp_path / "whole").train()

    interrupted = adapted_llama(method)
    trainer(interrupted, tmp_path / "parts", callbacks=[StopAt(SAVE_EVERY)]).train()
    assert not (tmp_path / "parts" / f"checkpoint-{STEPS}").exists()

    # Another adapter init: only the checkpoint can bring the resumed run back on track.
    resumed = adapted_llama(method, adapter_seed=99)
    checkpoint = tmp_path / "parts" / f"checkpoint-{SAVE_EVERY}"
    trainer(resumed, tmp_path / "parts").train(resume_from_checkpoint=str(checkpoint))

    # Same tensors, optimizer state, schedule, RNG and batches, in the same order, on CPU: bit for bit.
    expected, found = adapter_tensors(uninterrupted), adapter_tensors(resumed)
    assert found.keys() == expected.keys()
    for key in expected:
        assert torch.equal(found[key], expected[key]), key
    initial = adapter_tensors(adapted_llama(method))
    assert any(not torch.equal(expected[key], initial[key]) for key in expected)  # training did move the adapter


def test_prompt_tokens_carry_no_loss(tmp_path):
    """The loss is the mean of -log p(x_{t+1} | x_<=t) over the positions t+1 whose label is not -100: the prompt's
    positions have label -100, so they are in neither the sum nor the count, and the loss is the completion's alone.
    The labels are checked, and the trainer's loss (TRL's fused LM head, through the AdaptedModel) is checked against
    that mean formed here from the full logits."""
    model = adapted_llama("mor")
    randomise_adapters(model)  # a non-zero update, so that the adapters' part of the logits is checked too
    run = trainer(model, tmp_path)
    examples = [run.train_dataset[i] for i in range(4)]
    batch = run.data_collator(examples)

    tok = tokenizer()
    for row, (prompt, completion) in enumerate(pairs()[:4]):
        prompt_length = len(tok(prompt)["input_ids"])
        length = len(tok(f"{prompt} {completion} </s>")["input_ids"])
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        assert (labels[:prompt_length] == -100).all()
        assert torch.equal(labels[prompt_length:length], ids[prompt_length:length])  # completion and EOS
        assert (labels[length:] == -100).all()  # padding

    with torch.no_grad():
        loss = run.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    # The same mean with the prompt's labels given back (padding still masked) differs: the mask is what leaves it out.
    unmasked = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)[:, 1:]
    with_prompt = F.cross_entropy(logits[:, :-1].flatten(0, 1), unmasked.flatten(), ignore_index=-100)
    assert not torch.isclose(loss, with_prompt)


def test_refusals(tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    peft = pytest.importorskip("peft")
    with pytest.raises(rs.RankshareError, match="peft_config"):
        AdapterSFTTrainer(model=adapted_llama("lotr"), args=args, train_dataset=prompt_completion(),
                          processing_class=tokenizer(), peft_config=peft.LoraConfig(target_modules=TARGETS))
    with pytest.raises(rs.RankshareError, match="AdaptedModel"):
        AdapterSFTTrainer(model=llama(), args=args, train_dataset=prompt_completion(), processing_class=tokenizer())
    with pytest.raises(rs.RankshareError, match="processing_class"):  # a model built from a config names no tokenizer
        AdapterSFTTrainer(model=adapted_llama("lotr"), args=args, train_dataset=prompt_completion())
    head_adapted = rs.adapt(llama(), rs.MorConfig(rank=2, num_experts=2, target_modules=["lm_head"]))
    with pytest.raises(rs.RankshareError, match="LM head"):
        AdapterSFTTrainer(model=head_adapted, args=args, train_dataset=prompt_completion(),
                          processing_class=tokenizer())
