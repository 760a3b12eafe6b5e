"""Tiny models built from configs (no downloads), one per family the adapters must support."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import rankshare as rs
from rankshare.finetune.models import resolve_model


@dataclass
class Family:
    name: str
    build: Callable[[], nn.Module]
    targets: list[str]
    inputs: Callable[[], dict]
    modules_to_save: list[str]


def _token_inputs(vocab: int = 50) -> dict:
    generator = torch.Generator().manual_seed(7)
    return {"input_ids": torch.randint(0, vocab, (2, 6), generator=generator)}


def build_bert() -> nn.Module:
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def build_llama() -> nn.Module:
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def build_gpt2() -> nn.Module:
    config = GPT2Config(vocab_size=50, n_embd=32, n_layer=3, n_head=4, n_positions=32)
    return GPT2LMHeadModel(config).eval()


def build_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3))


FAMILIES = {
    "bert": Family("bert", build_bert, ["query", "value"], _token_inputs, ["classifier"]),
    "llama": Family("llama", build_llama, ["q_proj", "k_proj", "v_proj"], _token_inputs, []),
    "gpt2": Family("gpt2", build_gpt2, ["c_attn", "c_proj"], _token_inputs, []),
    "mlp": Family("mlp", build_mlp, ["0", "2", "4"],
                  lambda: {"input": torch.randn(5, 16, generator=torch.Generator().manual_seed(7))}, ["6"]),
}

METHODS = {
    "lotr": lambda targets: rs.LotrConfig(rank=4, alpha=8, target_modules=targets),
    "lotr_by_shape": lambda targets: rs.LotrConfig(rank=4, alpha=8, target_modules=targets, share="by_shape"),
    "mor": lambda targets: rs.MorConfig(rank=4, num_experts=3, alpha=8, target_modules=targets),
    "moelora": lambda targets: rs.MoeLoraConfig(rank=4, num_experts=3, alpha=8, target_modules=targets),
}


def base_model(family: Family, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return family.build()


def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@torch.no_grad()
def randomise_adapters(model: rs.AdaptedModel, seed: int = 1, std: float = 0.3) -> None:
    """Move every adapter tensor away from its init, so that no formula is checked at a trivial point."""
    generator = torch.Generator().manual_seed(seed)
    for key, tensor in model.adapter_state_dict().items():
        if key.startswith(tuple(model.modules_to_save)):
            continue
        tensor.add_(std * torch.randn(tensor.shape, generator=generator))


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(params=sorted(METHODS))
def method(request) -> str:
    return request.param


@pytest.fixture
def adapted(family: Family, method: str) -> rs.AdaptedModel:
    return rs.adapt(base_model(family), METHODS[method](family.targets), modules_to_save=family.modules_to_save)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT with MiniLM's tokenizer, saved as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model("minilm").path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def colours(tmp_path_factory) -> Path:
    """A small classification file: 40 texts of "red" words and 40 of "blue" words (text, label)."""
    data = tmp_path_factory.mktemp("data") / "colours.csv"
    generator = torch.Generator().manual_seed(0)
    words = {"red": "apple cherry blood rose fire", "blue": "sea sky ice whale jeans"}
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for label, vocabulary in words.items():
            for i in range(40):
                picks = torch.randint(0, 5, (6,), generator=generator).tolist()
                writer.writerow([" ".join(vocabulary.split()[p] for p in picks) + f" {i}", label])
    return data


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer LLaMA causal LM (a local folder), with MiniLM's word pieces as its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm").path)
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(folder)
    return folder


# Chat templates whose assistant turn ends with a token other than the end of sequence (<|endoftext|>).
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TEMPLATE_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]


def word_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A tokenizer of a few words split at whitespace; ``<|endoftext|>`` ends a sequence and pads, and the tokens
    of the ChatML and Llama-3 templates are special."""
    words = ["<|endoftext|>", "[UNK]", *TEMPLATE_TOKENS, "user", "assistant", "what", "is", "two", "plus", "four",
             "stop", "more"]
    backend = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        unk_token="[UNK]", model_input_names=["input_ids", "attention_mask"])
    tokenizer.add_tokens(TEMPLATE_TOKENS, special_tokens=True)  # in the vocabulary already: marked special
    tokenizer.chat_template = chat_template
    return tokenizer


def bigram_llama(tokenizer, successors: dict[str, str], otherwise: str) -> LlamaForCausalLM:
    """A one-layer LLaMA whose likeliest next token depends on the last token alone: ``successors[token]``, else
    ``otherwise``. Its embeddings are one-hot and reach the head unchanged (the attention's and the MLP's output
    projections are zero), and the head maps each token's direction to its successor alone. Its generation config
    names the tokenizer's end of sequence, as a model's config usually does."""
    vocab = len(tokenizer)
    width = vocab + vocab % 2  # one head, of an even width for the rotary embedding
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, intermediate_size=8, max_position_embeddings=64, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    head = torch.zeros(vocab, width)
    for token, name in enumerate(tokenizer.convert_ids_to_tokens(list(range(vocab)))):
        head[tokenizer.convert_tokens_to_ids(successors.get(name, otherwise)), token] = 1
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, width))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(head)
    return model
