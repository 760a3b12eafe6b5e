"""The `rankshare` command line, end to end on tiny local models and small data files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

import rankshare as rs
from rankshare.cli import main

WORDS = {
    "sports": "match goal team score win league player coach season",
    "finance": "market stock bank profit share price trade fund rate",
    "weather": "rain storm wind cloud sun snow cold heat forecast",
}


@pytest.fixture(scope="session")
def topics_csv(tmp_path_factory) -> Path:
    """Three separable topics, 60 distinct texts each."""
    path = tmp_path_factory.mktemp("data") / "topics.csv"
    generator = torch.Generator().manual_seed(0)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["body", "topic"])
        for topic, words in WORDS.items():
            vocabulary = words.split()
            for i in range(60):
                picks = torch.randint(0, len(vocabulary), (8,), generator=generator).tolist()
                writer.writerow([f"{' '.join(vocabulary[p] for p in picks)} {i}", topic])
    return path


def cli(*args: str) -> int:
    return main([str(a) for a in args])


def common(model: Path, data: Path) -> list:
    return ["--model", model, "--data", data, "--text-column", "body", "--label-column", "topic",
            "--max-length", 16, "--batch-size", 8, "--quiet"]


def test_train_writes_adapter_metrics_report_and_plot(tiny_bert, topics_csv, tmp_path):
    out = tmp_path / "run"
    assert cli("train", "--method", "lotr", "--rank", 4, "--epochs", 2, "--lr", 1e-2, *common(tiny_bert, topics_csv),
               "--out", out) == 0
    written = {p.name for p in out.iterdir()}
    assert {"adapter", "metrics.json", "report.md", "accuracy_vs_params.png", "run.json", "command.json"} <= written
    assert not (out / "checkpoint.pt").exists()  # removed once the run finished
    record = json.loads((out / "metrics.json").read_text())
    assert record["method"] == "lotr" and record["rank"] == 4
    # classify's recipe freezes Tucker-initialised U and V: the cores of 2 layers of query and value, 2·2·4²;
    # head 32·3 + 3.
    assert record["config"]["adapter"]["freeze_factors"] and record["config"]["adapter"]["init"] == "tucker"
    assert record["trainable_parameters"] == {"adapter": 2 * 2 * 4**2, "head": 99}
    assert record["steps"] == 2 * 18  # 144 training examples / 8, two epochs
    test = record["metrics"]["test"]["topics"]
    assert test["examples"] == 18 and 0 <= test["accuracy"] <= 1
    assert record["median_step_seconds"] > 0 and record["peak_memory_mb"] > 0
    assert set(record["versions"]) >= {"rankshare", "torch", "transformers", "peft"}


def test_compare_at_a_budget_reports_every_method(tiny_bert, topics_csv, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = cli("compare", "--budget", 1500, "--num-experts", 2, "--max-steps", 3, *common(tiny_bert, topics_csv),
               "--out", out)
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    methods = [run["method"] for run in summary["runs"]]
    assert methods == ["lora", "lotr", "mor", "moelora"]
    for run in summary["runs"]:
        assert abs(run["trainable_parameters"]["adapter"] - 1500) <= 750
        assert run["steps"] == 3 and run["plan"].startswith(f"rank {run['rank']}")
        assert (out / run["method"] / "adapter").is_dir()
    mor = summary["runs"][2]
    assert len(mor["router"]["topics"]) == 2 and abs(sum(mor["router"]["topics"]) - 1) < 1e-5
    assert (out / "router.png").is_file() and (out / "accuracy_vs_params.png").is_file()
    report = (out / "report.md").read_text()
    assert all(name in report for name in ("LoRA", "LoTR", "MoR", "MoE-LoRA"))
    printed = capsys.readouterr().out
    assert "| method |" in printed  # the table is printed too
    # resuming a finished comparison trains nothing and reports the same runs
    assert cli("compare", "--resume", out, "--quiet") == 0
    again = json.loads((out / "metrics.json").read_text())["runs"]
    assert [r["metrics"] for r in again] == [r["metrics"] for r in summary["runs"]]


def test_eval_reproduces_the_recorded_test_metrics(tiny_bert, topics_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("train", "--method", "mor", "--rank", 2, "--num-experts", 3, "--max-steps", 4,
               *common(tiny_bert, topics_csv), "--out", out) == 0
    capsys.readouterr()
    assert cli("eval", "--adapter", out, "--quiet") == 0
    evaluated = json.loads(capsys.readouterr().out)
    recorded = json.loads((out / "metrics.json").read_text())
    assert evaluated["metrics"]["test"] == recorded["metrics"]["test"]
    assert evaluated["router"]["topics"] == pytest.approx(recorded["router"]["topics"])


@pytest.mark.parametrize("method", ["lotr", "lora"])
def test_merge_writes_a_plain_model_with_the_same_outputs(tiny_bert, topics_csv, tmp_path, method):
    out, merged = tmp_path / "run", tmp_path / "merged"
    assert cli("train", "--method", method, "--rank", 2, "--max-steps", 4, "--lr", 5e-2,
               *common(tiny_bert, topics_csv), "--out", out) == 0
    assert cli("merge", "--adapter", out, "--out", merged) == 0
    from rankshare.finetune.trained import load_trained

    adapted, *_ = load_trained(out, "cpu")
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert not any(isinstance(m, rs.AdapterLayer) for m in plain.modules())
    ids = torch.randint(0, 30000, (3, 10))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    original = BertForSequenceClassification.from_pretrained(tiny_bert)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(plain.state_dict()[query], original.state_dict()[query], atol=1e-4)  # the update is in W


def test_merge_mor_needs_gates(tiny_bert, topics_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("train", "--method", "mor", "--rank", 2, "--num-experts", 2, "--max-steps", 2,
               *common(tiny_bert, topics_csv), "--out", out) == 0
    capsys.readouterr()
    assert cli("merge", "--adapter", out, "--out", tmp_path / "m1") == 2
    assert "--gates" in capsys.readouterr().err
    assert cli("merge", "--adapter", out, "--out", tmp_path / "m2", "--gates", "topics") == 0
    assert cli("merge", "--adapter", out, "--out", tmp_path / "m3", "--gates", "0.5,0.5") == 0
    assert (tmp_path / "m3" / "config.json").is_file()


def test_gates_of_a_task_are_each_layers_own_mean_routing(tiny_bert, topics_csv, tmp_path):
    """--gates TASK merges and exports every layer with that layer's recorded mean gates, not their average."""
    import peft

    from rankshare.finetune.trained import load_trained

    out = tmp_path / "run"
    assert cli("train", "--method", "mor", "--rank", 2, "--num-experts", 3, "--max-steps", 4, "--lr", 5e-2,
               *common(tiny_bert, topics_csv), "--out", out) == 0
    record = json.loads((out / "metrics.json").read_text())
    layers = dict(zip(record["router_modules"], record["router_layers"]["topics"]))
    assert len(layers) == 4 and len({tuple(g) for g in layers.values()}) == 4  # each layer routes its own way
    assert cli("merge", "--adapter", out, "--out", tmp_path / "merged", "--gates", "topics") == 0
    assert cli("export", "--adapter", out, "--out", tmp_path / "peft", "--gates", "topics") == 0
    ids = torch.randint(0, 30000, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = load_trained(out, "cpu")[0]
        reference = adapted.merge_and_unload(gates={name: torch.tensor(g) for name, g in layers.items()})(input_ids=ids)
        merged = BertForSequenceClassification.from_pretrained(tmp_path / "merged")(input_ids=ids)
        torch.testing.assert_close(merged.logits, reference.logits, rtol=1e-5, atol=1e-5)
        exported = peft.PeftModel.from_pretrained(load_trained(out, "cpu")[0].unload(), tmp_path / "peft").eval()
        torch.testing.assert_close(exported(input_ids=ids).logits, reference.logits, rtol=1e-5, atol=1e-5)
        averaged = load_trained(out, "cpu")[0].merge_and_unload(gates=record["router"]["topics"])(input_ids=ids)
        assert not torch.equal(averaged.logits, reference.logits)  # 4 steps move little, but the average differs


def test_interrupted_run_resumes_to_the_same_result(tiny_bert, topics_csv, tmp_path):
    """Stop after 5 of 12 steps (a checkpoint every 2), resume in a new workspace: same adapter as straight through."""
    from rankshare.finetune.jobs import Job
    from rankshare.finetune.running import Workspace, run_method

    settings = {"epochs": 1, "max_steps": None, "lr": 1e-2, "batch_size": 8, "seed": 3, "checkpoint_every": 2}
    job = Job(methods=["mor"], model=str(tiny_bert), data=str(topics_csv), text_column="body", label_column="topic",
              max_train=96, max_eval=12, max_length=16, settings=settings)
    config = rs.MorConfig(rank=2, num_experts=2, target_modules=["query", "value"])
    straight = run_method(Workspace(job, quiet=True), config, tmp_path / "straight")
    assert run_method(Workspace(job, quiet=True), config, tmp_path / "broken", stop_after=5) == {}
    assert (tmp_path / "broken" / "checkpoint.pt").is_file()
    resumed = run_method(Workspace(job, quiet=True), config, tmp_path / "broken")
    assert resumed["metrics"] == straight["metrics"]
    from safetensors.torch import load_file  # the saved adapters are identical tensors

    first, second = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("straight", "broken"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


BAD_INPUTS = [
    (["train", "--model", "/no/such/model"], "no such folder"),
    (["train", "--data", "/no/such/file.csv"], "No such file"),
    (["train", "--method", "dora"], "invalid choice"),
    (["train", "--rank", "0"], "must be >= 1"),
    (["compare", "--budget", "3"], "No method fits a budget of 3"),
    (["train", "--target-modules", "q[", "--dry-run"], "not a valid regular expression"),
    (["train", "--method", "lotr", "--num-experts", "4", "--dry-run"], "--num-experts is an option of mor, moelora"),
    (["train", "--method", "mor", "--num-experts", "0", "--dry-run"], "must be >= 1"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "rankshare.cli", *args, "--out", str(tmp_path / "o"), "--quiet"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def _bad_file(tmp_path: Path, name: str, rows: list[list[str]]) -> Path:
    path = tmp_path / name
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


@pytest.mark.parametrize(
    "rows, message",
    [
        ([["text", "stars"], ["good", "5"], ["bad", "1"]], "label"),  # no 'topic' column
        ([["body", "topic"]], "no"),  # empty
        ([["body", "topic"]] + [[f"text {i}", "only"] for i in range(30)], "only one label"),
    ],
)
def test_bad_data_files(tiny_bert, tmp_path, capsys, rows, message):
    path = _bad_file(tmp_path, "bad.csv", rows)
    assert cli("train", *common(tiny_bert, path), "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err.lower(), err


def test_existing_out_is_never_overwritten(tiny_bert, topics_csv, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.json").write_text('{"precious": true}')
    assert cli("train", *common(tiny_bert, topics_csv), "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == '{"precious": true}'


def test_causal_lm_learns_text_to_label(tiny_llama, topics_csv, tmp_path):
    """A causal LM generates label names; 3 separable topics are learnt well above chance (1/3)."""
    out = tmp_path / "t2l"
    args = common(tiny_llama, topics_csv)
    args[args.index("--max-length") + 1] = 24
    assert cli("train", "--method", "lotr", "--rank", 8, "--epochs", 3, "--lr", 3e-2, *args, "--out", out) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["config"]["objective"] == "text_to_label"
    assert record["trainable_parameters"]["head"] == 0
    assert record["metrics"]["test"]["topics"]["accuracy"] > 0.6


def test_language_modelling_reports_perplexity(tiny_llama, topics_csv, tmp_path):
    out = tmp_path / "lm"
    assert cli("train", "--method", "mor", "--rank", 2, "--num-experts", 2, "--objective", "lm", "--max-steps", 4,
               *common(tiny_llama, topics_csv), "--out", out) == 0
    test = json.loads((out / "metrics.json").read_text())["metrics"]["test"]
    assert test["topics"]["perplexity"] == pytest.approx(2.718281828 ** test["topics"]["loss"])
    assert 1 < test["topics"]["perplexity"] < 30522 * 2  # near or below uniform over the vocabulary
    assert (out / "report.md").read_text().count("perplexity") >= 1


def test_eval_on_another_file_of_the_same_task_and_merge_from_the_adapter_folder(tiny_bert, topics_csv, tmp_path,
                                                                                   capsys):
    out = tmp_path / "run"
    assert cli("train", "--method", "mor", "--rank", 2, "--num-experts", 2, "--max-steps", 2,
               *common(tiny_bert, topics_csv), "--out", out) == 0
    renamed = tmp_path / "other_name.csv"
    renamed.write_text(topics_csv.read_text())
    capsys.readouterr()
    assert cli("eval", "--adapter", out / "adapter", "--data", renamed, "--text-column", "body",
               "--label-column", "topic", "--quiet") == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["metrics"]["test"] == json.loads((out / "metrics.json").read_text())["metrics"]["test"]
    assert cli("merge", "--adapter", out / "adapter", "--out", tmp_path / "merged", "--gates", "topics") == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "topics:finance", "1": "topics:sports", "2": "topics:weather"}


def test_too_short_max_length_for_text_to_label_is_one_line(tiny_llama, topics_csv, tmp_path, capsys):
    args = common(tiny_llama, topics_csv)
    args[args.index("--max-length") + 1] = 6
    assert cli("train", *args, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-length" in err and "or more" in err


@pytest.mark.parametrize("budget", [50_000, 150_000, 400_000])
def test_dry_run_plans_the_defaults_fairly(budget, capsys):
    """On the demo's defaults every method lands within −10 %/+5 % of the budget, or is left out with its reason."""
    assert cli("compare", "--dry-run", "--budget", budget) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["lora", "lotr", "mor", "moelora"]
    for line in lines:
        if "left out" in line:
            assert "the nearest budget it can meet is" in line
            continue
        count = int(line.split(" gives ")[1].split(" ")[0].replace(",", ""))
        assert 0.9 * budget <= count <= 1.05 * budget, line


def test_a_run_folder_of_an_earlier_version_is_one_line(tiny_bert, topics_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("train", "--method", "lotr", "--rank", 2, "--max-steps", 1, *common(tiny_bert, topics_csv),
               "--out", out) == 0
    run = json.loads((out / "run.json").read_text())
    run["settings"] = {"method": "lotr", "rank": 2, "seed": 0, "batch_size": 8}  # the flat settings of before
    (out / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert cli("eval", "--adapter", out, "--quiet") == 2
    assert "written by an earlier rankshare" in capsys.readouterr().err


def test_resume_of_an_earlier_versions_command_is_one_line(tmp_path, capsys):
    """Before the registry, command.json kept the methods' options among the schedule's settings."""
    (tmp_path / "old").mkdir()
    old = {"methods": ["mor"], "settings": {"num_experts": 4, "share": "by_name", "seed": 0, "lr": None}}
    (tmp_path / "old" / "command.json").write_text(json.dumps(old))
    assert cli("train", "--resume", tmp_path / "old") == 2
    err = capsys.readouterr().err
    assert "is not one this version wrote" in err and len(err.strip().splitlines()) == 1
    assert cli("train", "--resume", tmp_path / "old", "--dry-run") == 2
    assert "--dry-run plans a new run" in capsys.readouterr().err


def test_compress_turns_a_lora_run_into_lotr_runs_that_eval_reads(tiny_bert, topics_csv, tmp_path, capsys):
    lora = tmp_path / "lora"
    assert cli("train", "--method", "lora", "--rank", 4, "--epochs", 1, "--lr", 1e-2, *common(tiny_bert, topics_csv),
               "--out", lora) == 0
    capsys.readouterr()
    out = tmp_path / "lotr"
    # 2 layers of rank-4 LoRA per group: LoTR at rank 8 holds them exactly, at rank 2 only approximately.
    assert cli("compress", "--adapter", lora, "--rank", "2,8", "--out", out) == 0
    table = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    errors = {(int(rank), group.strip()): float(error) for rank, group, *_, error in rows}
    assert len(errors) == 4 and all(errors[(8, group)] < 1e-5 < errors[(2, group)] for _, group in errors)

    from rankshare.finetune.trained import load_trained

    original, _, tokenizer, _ = load_trained(lora, "cpu")
    compressed, run, _, _ = load_trained(out / "rank-8", "cpu")
    assert run["settings"]["adapter"]["method"] == "lotr" and run["settings"]["adapter"]["rank"] == 8
    batch = tokenizer(["match goal team", "rain storm cold"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(compressed(**batch).logits, original(**batch).logits, rtol=1e-5, atol=1e-5)
    assert cli("eval", "--adapter", out / "rank-2", "--quiet") == 0
    assert cli("compress", "--adapter", out / "rank-8", "--rank", 4, "--out", tmp_path / "again") == 2
    assert "compress takes a LoRA run" in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_compress_takes_a_bare_peft_folder_with_its_base_model(tiny_bert, tmp_path, capsys):
    import peft

    torch.manual_seed(0)
    base = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=4, ignore_mismatched_sizes=True)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                     modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    lora.save_pretrained(tmp_path / "peft")
    ids = {"input_ids": torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        expected = lora.eval()(**ids).logits
    assert cli("compress", "--adapter", tmp_path / "peft", "--rank", 4, "--out", tmp_path / "none") == 2
    assert "give its base model with --model" in capsys.readouterr().err
    # 2 layers of rank-2 LoRA per group: rank 4 holds them exactly.
    assert cli("compress", "--adapter", tmp_path / "peft", "--model", tiny_bert, "--rank", 4, "--out",
               tmp_path / "lotr") == 0
    fresh = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=4, ignore_mismatched_sizes=True)
    model = rs.AdaptedModel.from_pretrained(fresh, tmp_path / "lotr")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, expected, rtol=1e-5, atol=1e-5)
