"""The command line under faults and launchers: kill -9 then --resume, and torchrun with 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from rankshare.finetune.models import resolve_model
from test_cli import topics_csv  # noqa: F401  (a fixture)

BIN = Path(sys.executable).parent


def save_tiny_bert(folder: Path, dropout: float) -> Path:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48,
                        max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model("minilm").path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def still_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT without dropout, so that runs differ only in what the test varies."""
    return save_tiny_bert(tmp_path_factory.mktemp("still-bert"), dropout=0.0)


@pytest.fixture(scope="module")
def tiny_bert_with_dropout(tmp_path_factory) -> Path:
    """Dropout on: the resumed run must also restore the random state."""
    return save_tiny_bert(tmp_path_factory.mktemp("dropout-bert"), dropout=0.2)


def arguments(model: Path, data: Path, out: Path, *extra) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--text-column", "body", "--label-column", "topic",
            "--max-length", "16", "--batch-size", "8", "--lr", "1e-2", "--quiet", "--out", str(out), *map(str, extra)]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def test_kill_9_then_resume_ends_as_an_uninterrupted_run(tiny_bert_with_dropout, topics_csv, tmp_path):  # noqa: F811
    """SIGKILL a real training process after its first checkpoint; --resume must end where a straight run ends."""
    common = ("--method", "mor", "--rank", "2", "--num-experts", "2", "--epochs", "30", "--checkpoint-every", "5")
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    process = subprocess.Popen([BIN / "rankshare", *arguments(tiny_bert_with_dropout, topics_csv, killed, *common)],
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists()  # it really was interrupted
    resumed = subprocess.run([BIN / "rankshare", "train", "--resume", str(killed), "--quiet"], capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    done = subprocess.run([BIN / "rankshare", *arguments(tiny_bert_with_dropout, topics_csv, straight, *common)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    first, second = adapter(killed), adapter(straight)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    metrics = [json.loads((folder / "metrics.json").read_text())["metrics"] for folder in (killed, straight)]
    assert metrics[0] == metrics[1]


@pytest.mark.parametrize("method", ["lotr", "mor"])
def test_torchrun_two_processes_match_one(still_bert, topics_csv, tmp_path, method):  # noqa: F811
    """2 processes with half of every batch each (gloo, DDP) end with the adapter of 1 process with whole batches."""
    common = ("--method", method, "--rank", "2", "--max-steps", "6", "--device", "cpu")
    common += ("--num-experts", "2") if method == "mor" else ()
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([BIN / "rankshare", *arguments(still_bert, topics_csv, one, *common)], capture_output=True,
                            text=True)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run([BIN / "torchrun", "--standalone", "--nproc_per_node", "2", "-m", "rankshare.cli",
                               *arguments(still_bert, topics_csv, two, *common)], capture_output=True, text=True,
                              env=env)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("| method |") == 1  # only the first process reports
    first, second = adapter(one), adapter(two)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-4, atol=1e-5, msg=key)
    record = json.loads((two / "metrics.json").read_text())
    assert record["processes"] == 2
    single_record = json.loads((one / "metrics.json").read_text())
    # every evaluation example is counted once, pooled from both processes
    for split in ("validation", "test"):
        assert record["metrics"][split]["topics"]["examples"] == single_record["metrics"][split]["topics"]["examples"]
