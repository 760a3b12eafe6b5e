"""The comparison report from synthetic run records: files, table contents and valid images."""

from __future__ import annotations

from pathlib import Path

import pytest

import rankshare as rs
from rankshare.finetune.report import markdown_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def classification_run(method: str, rank: int, adapter: int, news: float, sentiment: float, **extra) -> dict:
    def split(shift: float) -> dict:
        scores = {
            "news": {"accuracy": news - shift, "macro_f1": news - shift - 0.02, "examples": 200},
            "sentiment": {"accuracy": sentiment - shift, "macro_f1": sentiment - shift - 0.01, "examples": 300},
        }
        scores["average"] = {
            key: (scores["news"][key] + scores["sentiment"][key]) / 2 for key in ("accuracy", "macro_f1")
        }
        return scores

    return {
        "method": method,
        "rank": rank,
        "config": {"model": "all-MiniLM-L6-v2", "data": "news+sentiment", "learning_rate": 1e-3},
        "trainable_parameters": {"adapter": adapter, "head": 1925},
        "metrics": {"validation": split(0.0), "test": split(0.01)},
        "train_seconds": 61.2,
        "median_step_seconds": 0.71,
        "peak_memory_mb": 812.0,
        "steps": 80,
        "seed": 0,
        **extra,
    }


def classification_runs() -> list[dict]:
    return [
        classification_run("lora", 8, 294_912, 0.91, 0.85),
        classification_run("lotr", 8, 26_112, 0.90, 0.86, train_seconds=1234.56),
        classification_run(
            "mor", 4, 131_072, 0.92, 0.83,
            router={"news": [0.3, 0.1, 0.4, 0.2], "sentiment": [0.1, 0.2, 0.3, 0.4]},
        ),
    ]


def language_modelling_runs() -> list[dict]:
    def run(method: str, rank: int, adapter: int, perplexity: float) -> dict:
        scores = {"wiki": {"perplexity": perplexity, "loss": 3.0, "tokens": 5000}}
        return {
            "method": method, "rank": rank, "config": {"model": "SmolLM2-135M"},
            "trainable_parameters": {"adapter": adapter, "head": 0},
            "metrics": {"validation": scores, "test": scores},
            "train_seconds": 20.0, "median_step_seconds": 0.25, "peak_memory_mb": 1500.4, "steps": 50, "seed": 1,
        }

    return [run("lora", 8, 1_000_000, 23.4), run("lotr", 16, 150_000, 24.56), run("moelora", 2, 2_100_000, 1234.5)]


def assert_valid_png(path: Path) -> None:
    image = pytest.importorskip("matplotlib.image")
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = image.imread(path)
    height, width = pixels.shape[:2]
    assert 300 <= height <= 3000 and 300 <= width <= 3000


def test_classification_report_files(tmp_path):
    out = tmp_path / "report"
    paths = write_report(out, classification_runs())
    assert paths == [out / "report.md", out / "accuracy_vs_params.png", out / "router.png"]
    # nothing else, no temporary files in particular
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_vs_params.png", "report.md", "router.png"]
    assert_valid_png(out / "accuracy_vs_params.png")
    assert_valid_png(out / "router.png")
    text = (out / "report.md").read_text()
    assert text.startswith("# ")
    assert "3 runs fine-tuned from `all-MiniLM-L6-v2` on `news+sentiment`, 80 steps each, seed 0." in text
    assert "on the test split" in text
    assert markdown_table(classification_runs()) in text
    assert "](accuracy_vs_params.png)" in text and "](router.png)" in text


def test_classification_table_contents():
    table = markdown_table(classification_runs())
    lines = table.strip().split("\n")
    assert len(lines) == 2 + 3
    assert lines[0] == (
        "| method | rank | adapter params | head params | news accuracy | news macro-F1 | sentiment accuracy "
        "| sentiment macro-F1 | average accuracy | average macro-F1 | train time | median step | peak memory |"
    )
    # test split: each score 0.01 below validation
    assert lines[2] == (
        "| LoRA | 8 | 294,912 | 1,925 | 90.0 % | 88.0 % | 84.0 % | 83.0 % | 87.0 % | 85.5 % | 61.2 s | 0.710 s "
        "| 812 MB |"
    )
    assert lines[3].startswith(
        "| LoTR | 8 | 26,112 | 1,925 | 89.0 % | 87.0 % | 85.0 % | 84.0 % | 87.0 % | 85.5 % | 1,234.6 s |"
    )
    assert lines[4].startswith("| MoR | 4 | 131,072 | 1,925 | 91.0 % |")


def test_missing_values_and_average_are_tolerated(tmp_path):
    runs = classification_runs()[:2]
    for run in runs:
        del run["config"], run["peak_memory_mb"], run["metrics"]["test"]["average"]
    runs[1]["rank"] = None
    table = markdown_table(runs)
    assert "| LoTR | — | 26,112 |" in table
    assert "| 87.0 % | 85.5 % | 1,234.6 s | 0.710 s | — |" in table  # average computed from the tasks
    paths = write_report(tmp_path, runs)
    assert [p.name for p in paths] == ["report.md", "accuracy_vs_params.png"]
    assert "2 runs fine-tuned, 80 steps each, seed 0." in (tmp_path / "report.md").read_text()


def test_no_router_no_router_plot(tmp_path):
    paths = write_report(tmp_path, classification_runs()[:2])
    assert not (tmp_path / "router.png").exists()
    assert "router.png" not in (tmp_path / "report.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_language_modelling_report(tmp_path):
    runs = language_modelling_runs()
    table = markdown_table(runs)
    header = ("| method | rank | adapter params | head params | wiki perplexity | train time | median step "
              "| peak memory |")
    assert table.startswith(header + "\n")
    assert "| LoRA | 8 | 1,000,000 | 0 | 23.40 | 20.0 s | 0.250 s | 1,500 MB |" in table
    assert "| LoTR | 16 | 150,000 | 0 | 24.56 |" in table
    assert "| MoE-LoRA | 2 | 2,100,000 | 0 | 1,234.50 |" in table
    assert "accuracy" not in table
    paths = write_report(tmp_path, runs)
    assert [p.name for p in paths] == ["report.md", "accuracy_vs_params.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_vs_params.png", "report.md"]
    assert_valid_png(tmp_path / "accuracy_vs_params.png")
    text = (tmp_path / "report.md").read_text()
    assert "lower is better" in text and "`SmolLM2-135M`" in text and "seed 1" in text


def test_validation_split_when_no_run_has_test():
    runs = classification_runs()
    for run in runs:
        del run["metrics"]["test"]
    assert "| LoRA | 8 | 294,912 | 1,925 | 91.0 % |" in markdown_table(runs)


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ([], "No runs"),
        ([{"rank": 8}], "needs 'method' and 'metrics'"),
        ([{"method": "lora", "metrics": {"train": {}}}], "'test'"),
        (classification_runs()[:1] + language_modelling_runs()[:1], "mix classification, language modelling"),
    ],
)
def test_bad_records_are_errors(runs, message, tmp_path):
    with pytest.raises(rs.RankshareError, match=message):
        write_report(tmp_path, runs)
    assert list(tmp_path.iterdir()) == []
