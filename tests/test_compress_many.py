"""`rankshare compress` with several LoRA runs: news and sentiment LoRAs of the real MiniLM compressed into one LoTR
basis, read back by eval and served together by predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rankshare.cli import main
from rankshare.finetune.trained import load_trained


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    """LoRA r = 2 on MiniLM's query and value, a few steps on news (5 topics) and on sentiment (3 classes)."""
    root = tmp_path_factory.mktemp("loras")
    for task in ("news", "sentiment"):
        assert cli("train", "--model", "minilm", "--data", task, "--method", "lora", "--rank", 2, "--lr", 1e-2,
                   "--max-train", 48, "--max-eval", 16, "--max-length", 32, "--batch-size", 16, "--quiet",
                   "--out", root / task) == 0
    return {task: root / task for task in ("news", "sentiment")}


def test_news_and_sentiment_share_one_basis_exactly_at_full_rank(loras, tmp_path, capsys):
    out = tmp_path / "joint"
    capsys.readouterr()
    # 2 tasks x 6 layers x rank 2 = 24 directions per group: rank 24 holds both LoRAs, rank 4 only roughly.
    assert cli("compress", "--adapter", f"news={loras['news']}", "--adapter", f"sentiment={loras['sentiment']}",
               "--rank", "4,24", "--out", out) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    errors = {(int(r[0]), r[1].strip()): float(r[2]) for r in rows if r[2].strip()}
    for task in ("news", "sentiment"):
        assert errors[24, task] < 1e-5 < 1e-2 < errors[4, task] < 1, errors
    assert sorted(p.name for p in (out / "rank-24").iterdir()) == ["basis", "news", "sentiment"]

    texts = ["Shares fell sharply as the bank cut its profit forecast", "I love this so much, best day ever"]
    for task in ("news", "sentiment"):
        original, _, tokenizer, _ = load_trained(loras[task], "cpu")
        compressed, run, _, _ = load_trained(out / "rank-24" / task, "cpu")
        assert run["settings"]["adapter"]["basis"] == "basis" and run["basis"]["run"] == str(out / "rank-24" / "basis")
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            torch.testing.assert_close(compressed(**batch).logits, original(**batch).logits, rtol=1e-4, atol=1e-4)
    assert cli("eval", "--adapter", out / "rank-4" / "sentiment", "--quiet") == 0

    # Both tasks from one base model in mixed batches: each row as its task's compressed run alone predicts it.
    rows = tmp_path / "rows.csv"
    rows.write_text("text,task\n" + "".join(f'"{t}",{task}\n' for t in texts for task in ("news", "sentiment")))
    adapters = [f"--adapter={task}={out / 'rank-24' / task}" for task in ("news", "sentiment")]
    assert cli("predict", *adapters, "--data", rows, "--out", tmp_path / "mixed.jsonl", "--quiet") == 0
    mixed = [json.loads(line) for line in (tmp_path / "mixed.jsonl").read_text().splitlines()]
    for task in ("news", "sentiment"):
        alone = tmp_path / f"{task}.jsonl"
        single = rows.with_name(f"{task}.csv")
        single.write_text("text,task\n" + "".join(f'"{t}",{task}\n' for t in texts))
        assert cli("predict", adapters[task == "sentiment"], "--data", single, "--out", alone, "--quiet") == 0
        expected = [json.loads(line)["prediction"] for line in alone.read_text().splitlines()]
        assert [row["prediction"] for row in mixed if row["task"] == task] == expected


def test_inputs_that_cannot_be_compressed_together_are_one_line(loras, tmp_path, capsys):
    lotr = tmp_path / "lotr"
    assert cli("train", "--model", "minilm", "--data", "news", "--method", "lotr", "--rank", 2, "--max-train", 16,
               "--max-eval", 8, "--max-length", 16, "--batch-size", 16, "--quiet", "--out", lotr) == 0
    capsys.readouterr()
    cases = [
        ([f"news={loras['news']}", str(loras["sentiment"])], "distinct name each"),
        ([f"news={loras['news']}", f"news={loras['sentiment']}"], "distinct name each"),
        ([f"news={loras['news']}", f"other={lotr}"], "compress takes LoRA runs"),
        ([str(loras["news"]), "--recover-steps=3"], "several LoRAs compressed into one basis"),
        ([f"news={loras['news']}", f"sentiment={loras['sentiment']}", "--recover-lr=0.1"], "give both, or neither"),
    ]
    for adapters, message in cases:
        out = tmp_path / "out"
        options = [a if a.startswith("--") else f"--adapter={a}" for a in adapters]
        assert cli("compress", *options, "--rank", 4, "--out", out) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and "\n" not in error and not out.exists()


def test_recovery_trains_the_cores_alone(loras, tmp_path):
    plain, recovered = tmp_path / "plain", tmp_path / "recovered"
    adapters = [f"--adapter=news={loras['news']}", f"--adapter=sentiment={loras['sentiment']}"]
    assert cli("compress", *adapters, "--rank", 4, "--out", plain) == 0
    assert cli("compress", *adapters, "--rank", 4, "--recover-steps", 1, "--quiet", "--out", tmp_path / "default") == 0
    run = json.loads((tmp_path / "default" / "rank-4" / "news" / "run.json").read_text())
    assert run["recovered"]["learning_rate"] == 3e-2  # the default rate
    assert cli("compress", *adapters, "--rank", 4, "--recover-steps", 3, "--recover-lr", 0.05, "--quiet", "--out",
               recovered) == 0
    for task in ("news", "sentiment"):
        run = json.loads((recovered / "rank-4" / task / "run.json").read_text())
        assert run["recovered"]["steps"] == 3 and run["recovered"]["learning_rate"] == 0.05
        assert run["recovered"]["trainable_parameters"]["head"] == 0  # the head stays as the LoRA left it
        before, *_ = load_trained(plain / "rank-4" / task, "cpu")
        after, *_ = load_trained(recovered / "rank-4" / task, "cpu")
        assert before.basis_fingerprint("basis") == after.basis_fingerprint("basis")
        old, new = before.adapter_state_dict(), after.adapter_state_dict()
        cores = [key for key in old if key.endswith(".core")]
        assert cores and all(not torch.equal(old[key], new[key]) for key in cores)
        assert all(torch.equal(old[key], new[key]) for key in old if key not in cores)
