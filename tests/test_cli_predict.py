"""Tasks on a shared LoTR basis (``train --basis``) and ``rankshare predict`` with several adapters on one model."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from rankshare.cli import main
from rankshare.finetune import predict
from rankshare.finetune.jobs import BASIS_ADAPTER
from rankshare.finetune.models import resolve_model
from rankshare.finetune.trained import load_trained

TASKS = {
    "topics": {"sports": "match goal team score win", "finance": "market stock bank profit share",
               "weather": "rain storm wind cloud snow"},
    "moods": {"happy": "joy smile laugh glad fun", "sad": "tears cry gloom sorrow grief"},
    "colors": {"red": "fire blood rose cherry", "blue": "sea sky ocean navy", "green": "grass leaf tree moss",
               "yellow": "sun lemon gold corn"},
}
SCHEDULE = ["--max-length", 16, "--batch-size", 8, "--max-steps", 8, "--lr", 3e-2, "--quiet"]


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, Path]:
    """One small csv per task (text, label): 16 distinct texts per label."""
    folder = tmp_path_factory.mktemp("tasks")
    generator = random.Random(0)
    files = {}
    for task, labels in TASKS.items():
        files[task] = folder / f"{task}.csv"
        with files[task].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for label, words in labels.items():
                for i in range(16):
                    writer.writerow([" ".join(generator.choices(words.split(), k=6)) + f" {i}", label])
    return files


@pytest.fixture(scope="module")
def keen_bert(tmp_path_factory) -> Path:
    """tiny_bert's shape with weights drawn 10× wider: its outputs depend on the text (tiny_bert's hardly do), so
    predictions vary from row to row and a row sent to the wrong adapter or place shows."""
    folder = tmp_path_factory.mktemp("keen-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=128, initializer_range=0.2)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model("minilm").path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(keen_bert, task_files, tmp_path_factory) -> dict[str, Path]:
    """A LoTR run on topics (the basis), and moods and colors trained on its factors."""
    folder = tmp_path_factory.mktemp("runs")
    out = {task: folder / task for task in TASKS}
    assert cli("train", "--method", "lotr", "--rank", 4, "--model", keen_bert, "--data", task_files["topics"],
               *SCHEDULE, "--out", out["topics"]) == 0
    for task in ("moods", "colors"):
        assert cli("train", "--basis", out["topics"], "--data", task_files[task], *SCHEDULE, "--out", out[task]) == 0
    return out


@pytest.fixture(scope="module")
def mixed_rows(task_files, tmp_path_factory) -> Path:
    """Rows of all three tasks, shuffled, so that batches mix adapters."""
    rows = []
    for task, path in task_files.items():
        with path.open() as f:
            rows += [{"text": row["text"], "task": task} for row in list(csv.DictReader(f))[::3]]
    random.Random(1).shuffle(rows)
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def alone(run_folder: Path, texts: list[str]) -> list[str]:
    """Each text's label by the run's adapter alone: its model rebuilt by itself, the texts in one batch."""
    model, run, tokenizer, _ = load_trained(run_folder, "cpu")
    (labels,) = run["tasks"].values()
    encoded = tokenizer(texts, truncation=True, max_length=run["job"]["max_length"], padding=True,
                        return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
    assert logits.shape == (len(texts), len(labels))
    return [labels[i] for i in logits.argmax(-1).tolist()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_task_on_a_basis_saves_only_its_cores_and_head(runs):
    basis, *_ = load_trained(runs["topics"], "cpu")
    for task, labels in (("moods", 2), ("colors", 4)):
        tensors = load_file(runs[task] / "adapter" / "adapter_model.safetensors")
        cores = [key for key in tensors if key.endswith(".core")]
        head = [key for key in tensors if key.startswith("classifier.")]
        assert sorted(cores + head) == sorted(tensors)  # no factors: they stay in the basis run
        assert len(cores) == 4 and all(tensors[key].shape == (4, 4) for key in cores)  # 2 layers × query, value
        record = json.loads((runs[task] / "metrics.json").read_text())
        # L r² per group of L layers, U and V borrowed; the head is 32 × labels + labels
        assert record["trainable_parameters"] == {"adapter": 2 * (2 * 4**2), "head": 33 * labels}
        run = json.loads((runs[task] / "run.json").read_text())
        assert run["basis"] == {"run": str(runs["topics"]), "fingerprint": basis.basis_fingerprint("default")}
        config = json.loads((runs[task] / "adapter" / "adapter_config.json").read_text())
        assert config["basis_fingerprint"] == run["basis"]["fingerprint"]
        assert config["config"]["basis"] == BASIS_ADAPTER


def test_eval_and_merge_rebuild_a_run_on_a_basis(runs, tmp_path, capsys):
    capsys.readouterr()
    assert cli("eval", "--adapter", runs["moods"], "--quiet") == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["metrics"]["test"] == json.loads((runs["moods"] / "metrics.json").read_text())["metrics"]["test"]
    assert cli("merge", "--adapter", runs["colors"], "--out", tmp_path / "merged") == 0
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    adapted, *_ = load_trained(runs["colors"], "cpu")
    ids = torch.randint(0, 30000, (3, 10))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_predict_gives_each_row_what_its_adapter_alone_gives(runs, mixed_rows, tmp_path, capsys):
    out = tmp_path / "predictions.jsonl"
    capsys.readouterr()
    assert cli("predict", *(f"--adapter={task}={runs[task]}" for task in TASKS), "--data", mixed_rows,
               "--out", out, "--batch-size", 4, "--quiet") == 0
    assert "rows/s" in capsys.readouterr().err
    rows, predicted = read_jsonl(mixed_rows), read_jsonl(out)
    assert [p["task"] for p in predicted] == [p["adapter"] for p in predicted] == [r["task"] for r in rows]
    for task in TASKS:
        mine = [i for i, row in enumerate(rows) if row["task"] == task]
        expected = alone(runs[task], [rows[i]["text"] for i in mine])
        assert [predicted[i]["prediction"] for i in mine] == expected, task
        assert len(set(expected)) > 1, f"{task}: one label for every row would check little"


def test_predict_loads_the_recorded_basis_when_no_adapter_is_it(runs, mixed_rows, tmp_path):
    rows = [row for row in read_jsonl(mixed_rows) if row["task"] != "topics"]
    data = tmp_path / "rows.csv"
    with data.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["task", "text"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "predictions.jsonl"
    assert cli("predict", "--adapter", f"moods={runs['moods']}", "--adapter", f"colors={runs['colors']}",
               "--data", data, "--out", out, "--batch-size", 5, "--quiet") == 0
    predicted = [p["prediction"] for p in read_jsonl(out)]
    for task in ("moods", "colors"):
        mine = [i for i, row in enumerate(rows) if row["task"] == task]
        assert [predicted[i] for i in mine] == alone(runs[task], [rows[i]["text"] for i in mine])


@pytest.fixture
def lotr_run_elsewhere(runs, tmp_path) -> Path:
    """A copy of the colors run whose recorded basis is somewhere else."""
    copy = tmp_path / "colors-copy"
    shutil.copytree(runs["colors"], copy)
    return copy


def _edit_run(folder: Path, edit) -> None:
    run = json.loads((folder / "run.json").read_text())
    edit(run)
    (folder / "run.json").write_text(json.dumps(run))


TRAIN_ERRORS = [
    (["--method", "mor"], "not a mor adapter"),
    (["--rank", "8"], "was trained with --rank 4"),
    (["--target-modules", "query"], "was trained with --target-modules query,value"),
    (["--share", "by_shape"], "was trained with --share by_name"),
    (["--budget", "500"], "leave out --budget"),
]


@pytest.mark.parametrize("args, message", TRAIN_ERRORS)
def test_train_on_a_basis_refuses_options_that_disagree(runs, task_files, tmp_path, capsys, args, message):
    capsys.readouterr()
    assert cli("train", "--basis", runs["topics"], "--data", task_files["moods"], *args, "--out", tmp_path / "o",
               "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_train_on_a_basis_takes_the_basis_runs_settings_and_refuses_other_bases(runs, task_files, keen_bert, tmp_path,
                                                                                capsys):
    assert cli("train", "--basis", runs["topics"], "--rank", 4, "--model", keen_bert, "--dry-run") == 0
    assert capsys.readouterr().out.strip() == f"lotr: rank 4 (on the factors of {runs['topics']})"
    assert cli("train", "--basis", runs["moods"], "--data", task_files["colors"], "--out", tmp_path / "o") == 2
    assert f"itself trained on the factors of {runs['topics']}" in capsys.readouterr().err
    mor = tmp_path / "mor"
    assert cli("train", "--method", "mor", "--rank", 2, "--num-experts", 2, "--model", keen_bert, "--data",
               task_files["moods"], *SCHEDULE, "--max-steps", 1, "--out", mor) == 0
    capsys.readouterr()
    assert cli("train", "--basis", mor, "--data", task_files["colors"], "--out", tmp_path / "o") == 2
    assert "is a mor run; the basis must be a trained lotr run" in capsys.readouterr().err
    assert cli("train", "--basis", tmp_path / "nowhere", "--data", task_files["colors"], "--out", tmp_path / "o") == 2
    assert "--basis" in capsys.readouterr().err and not (tmp_path / "o").exists()


def tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_predict_errors_are_one_line_and_load_no_model(runs, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(predict, "run_base", no_model)
    out = tmp_path / "predictions.jsonl"
    out.write_text("precious\n")
    adapters = ["--adapter", f"moods={runs['moods']}", "--adapter", f"colors={runs['colors']}"]
    cases = [
        (_write_jsonl(tmp_path / "a.jsonl", [{"text": "fire sea", "task": "colors"}, {"text": "x", "task": "sports"},
                                             {"text": "y", "task": "weather"}]),
         "name tasks that no --adapter has: sports, weather (first in row 2); the adapters are moods, colors"),
        (_write_jsonl(tmp_path / "b.jsonl", [{"text": "fire sea", "kind": "colors"}]), "no column 'task'"),
        (_write_jsonl(tmp_path / "c.jsonl", [{"body": "fire sea", "task": "colors"}]), "no column 'text'"),
        (_write_jsonl(tmp_path / "d.jsonl", []), "has no rows"),
        (_write_jsonl(tmp_path / "e.jsonl", [{"text": " ", "task": "colors"}]), "Row 1 of"),
        (tmp_path / "missing.jsonl", "is not a file"),
    ]
    for data, message in cases:
        capsys.readouterr()
        assert cli("predict", *adapters, "--data", data, "--out", out, "--quiet") == 2, message
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert out.read_text() == "precious\n"

    rows = _write_jsonl(tmp_path / "rows.jsonl", [{"text": "fire sea", "task": "colors"}])
    for bad, message in [(["--adapter", "colors=x=y"], "not a rankshare run folder"),
                         (["--adapter", "colors"], "expected TASK=DIR"),
                         (["--adapter", f"__colors={runs['colors']}"], "not starting with '__'"),
                         (["--adapter", f"colors={runs['colors']}"] * 2, "given twice")]:
        assert cli("predict", *bad, "--data", rows, "--out", out, "--quiet") == 2
        assert message in capsys.readouterr().err
    assert out.read_text() == "precious\n"


def test_predict_refuses_adapters_on_other_models_or_without_their_basis(runs, lotr_run_elsewhere, tmp_path, capsys):
    rows = _write_jsonl(tmp_path / "rows.jsonl", [{"text": "fire sea", "task": "colors"}])
    out = tmp_path / "predictions.jsonl"
    _edit_run(lotr_run_elsewhere, lambda run: run["basis"].update(run=str(tmp_path / "gone")))
    capsys.readouterr()
    assert cli("predict", "--adapter", f"colors={lotr_run_elsewhere}", "--data", rows, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert f"trained on the shared factors of the run {tmp_path / 'gone'}, which is not there" in err
    assert len(err.splitlines()) == 1 and not out.exists()

    _edit_run(lotr_run_elsewhere, lambda run: run["basis"].update(run=str(runs["topics"]), fingerprint="0" * 64))
    assert cli("predict", "--adapter", f"colors={lotr_run_elsewhere}", "--data", rows, "--out", out, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert "factors have changed" in err and len(err.splitlines()) == 1 and not out.exists()

    _edit_run(lotr_run_elsewhere, lambda run: run["job"].update(model="minilm"))
    assert cli("predict", "--adapter", f"colors={lotr_run_elsewhere}", "--adapter", f"moods={runs['moods']}",
               "--data", rows, "--out", out) == 2
    assert "different base models" in capsys.readouterr().err and not out.exists()


def test_predict_with_causal_lms_scores_labels_and_generates(tiny_llama, task_files, tmp_path, capsys):
    """Label scoring and generation in mixed batches equal each adapter alone."""
    runs = {task: tmp_path / task for task in ("topics", "moods")}
    schedule = [*SCHEDULE, "--model", tiny_llama]
    schedule[1] = 24  # --max-length: room for the prompt and label names
    assert cli("train", "--rank", 4, "--data", task_files["topics"], *schedule, "--out", runs["topics"]) == 0
    assert cli("train", "--basis", runs["topics"], "--data", task_files["moods"], *schedule,
               "--out", runs["moods"]) == 0
    texts = [("fire sea joy", "moods"), ("rain match", "topics"), ("tears smile", "moods"), ("bank snow", "topics")]
    rows = _write_jsonl(tmp_path / "rows.jsonl", [{"text": text, "task": task} for text, task in texts])
    out = tmp_path / "labels.jsonl"
    assert cli("predict", "--adapter", f"topics={runs['topics']}", "--adapter", f"moods={runs['moods']}",
               "--data", rows, "--out", out, "--quiet") == 0
    predicted = [p["prediction"] for p in read_jsonl(out)]
    trained = {task: load_trained(folder, "cpu") for task, folder in runs.items()}
    for i, (text, task) in enumerate(texts):
        model, run, tokenizer, _ = trained[task]
        labels = run["tasks"][task]
        scores = []
        for label in labels:  # log p(" label" | "text\ntask:"), the prompt the run was trained on
            prompt = [*tokens(tokenizer, text), *tokens(tokenizer, f"\n{task}:")]
            answer = tokens(tokenizer, f" {label}")
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
            scores.append(logits.log_softmax(-1).gather(1, torch.tensor(answer)[:, None]).sum().item())
        assert predicted[i] == labels[max(range(len(labels)), key=scores.__getitem__)], (text, scores)

    lm = tmp_path / "lm"
    assert cli("train", "--method", "lotr", "--rank", 4, "--objective", "lm", "--data", task_files["colors"],
               *schedule, "--out", lm) == 0
    out = tmp_path / "text.jsonl"
    rows = _write_jsonl(tmp_path / "lm.jsonl", [{"text": "fire", "task": "lm"}, {"text": "sea sky ocean navy grass",
                                                                                 "task": "lm"}])
    assert cli("predict", "--adapter", f"lm={lm}", "--data", rows, "--out", out, "--max-new-tokens", 4,
               "--quiet") == 0
    model, _, tokenizer, _ = load_trained(lm, "cpu")
    for row, written in zip(read_jsonl(rows), read_jsonl(out)):
        ids = tokenizer(row["text"], return_tensors="pt")["input_ids"][:, :-1]  # without the closing [SEP]
        alone_ids = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1] :]
        assert written["prediction"] == tokenizer.decode(alone_ids, skip_special_tokens=True).strip()


def test_export_writes_peft_folders_that_predict_as_the_runs_do(runs, keen_bert, tmp_path, capsys):
    import peft

    out = tmp_path / "peft"
    assert cli("export", *[f"--adapter={task}={folder}" for task, folder in runs.items()], "--out", out) == 0
    texts = ["goal match team win 1", "rain cold snow wind 2", "happy glad joy 3"]
    for task, folder in runs.items():
        model, run, tokenizer, _ = load_trained(folder, "cpu")
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        (labels,) = run["tasks"].values()
        base = BertForSequenceClassification.from_pretrained(keen_bert, num_labels=len(labels),
                                                             ignore_mismatched_sizes=True)
        served = peft.PeftModel.from_pretrained(base, str(out / task)).eval()
        with torch.no_grad():
            torch.testing.assert_close(served(**encoded).logits, model(**encoded).logits, rtol=1e-5, atol=1e-5)

    capsys.readouterr()
    assert cli("eval", "--adapter", runs["moods"], "--peft", out / "moods", "--quiet") == 0
    through_peft = json.loads(capsys.readouterr().out)
    assert cli("eval", "--adapter", runs["moods"], "--quiet") == 0
    assert through_peft["metrics"] == json.loads(capsys.readouterr().out)["metrics"]
    assert cli("eval", "--adapter", runs["moods"], "--peft", tmp_path, "--quiet") == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert cli("export", "--adapter", runs["topics"], "--out", out) == 2  # an existing --out
    assert "--overwrite" in capsys.readouterr().err
    assert cli("export", "--adapter", runs["topics"], "--adapter", runs["moods"], "--out", tmp_path / "x") == 2
    assert "need a distinct name each" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and not (tmp_path / "x").exists()
