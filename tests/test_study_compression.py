"""The compression study (many LoRAs, one basis): single-task LoRAs trained, compressed jointly and each alone,
every adapter scored; on a tiny LLaMA with two skills tasks."""

from __future__ import annotations

import json
import shutil

import pytest

import rankshare as rs
from rankshare.study.compression import CompressionPart, compression_section, run_compression, separate_rank


@pytest.fixture(scope="module")
def study(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("compression")
    part = CompressionPart("compress-tiny", str(tiny_llama), ("add", "sort"), lora_rank=2, max_train=8, max_eval=2,
                           max_length=64, batch_size=4, learning_rate=1e-2, ranks=(2, 8), recover_ranks=(2,),
                           recover_steps=2, recover_rates=(None, 0.05), module_ranks=(4,),
                           module_recover_ranks=(4,))
    run_compression(part, out, quiet=True, say=lambda text: None)
    records = {p.stem: json.loads(p.read_text()) for p in (out / part.name).glob("*.json") if p.name != "part.json"}
    return part, out, records


def test_every_adapter_is_trained_compressed_and_scored(study):
    part, out, records = study
    kinds = sorted({(r["kind"], r["rank"]) for r in records.values()})
    # q_proj 32 x 32 and v_proj 16 x 32 in 2 layers: the separate rank whose two adapters match the joint's size
    assert kinds == [("joint", 2), ("joint", 8), ("joint, a basis per module", 4),
                     ("joint, a basis per module, recovered", 4), ("joint, a basis per module, recovered at 0.05", 4),
                     ("joint, recovered", 2),
                     ("joint, recovered at 0.05", 2), ("lora", 2),
                     ("separate", separate_rank(part, 2, _runs(out, part))),
                     ("separate", separate_rank(part, 8, _runs(out, part)))]
    assert all(0 <= r["exact_match"] <= 1 and r["task"] in r["metrics"] for r in records.values())
    # 2 tasks x 2 layers x LoRA rank 2 = 8 directions per group: rank 8 holds both LoRAs exactly, and scores alike.
    for task in part.tasks:
        assert records[f"joint-r8-{task}"]["relative_error"] < 1e-5
        assert records[f"joint-r8-{task}"]["exact_match"] == records[f"lora-{task}"]["exact_match"]
        # A basis per module holds a module's 2 x 2 directions at rank 4.
        assert records[f"joint-by-module-r4-{task}"]["relative_error"] < 1e-5
        assert records[f"joint-by-module-r4-{task}"]["exact_match"] == records[f"lora-{task}"]["exact_match"]
        assert records[f"joint-r2-recovered-{task}"]["recovered"]["steps"] == 2
        assert records[f"joint-r2-recovered-{task}"]["recovered"]["learning_rate"] == part.learning_rate
        assert records[f"joint-r2-recovered-lr0.05-{task}"]["recovered"]["learning_rate"] == 0.05
        assert records[f"joint-by-module-r4-recovered-{task}"]["recovered"]["steps"] == 2


def test_the_separate_rank_matches_the_joint_size_by_hand(study):
    part, out, _ = study
    shapes = {f"model.layers.{i}.self_attn.{p}": s for i in range(2) for p, s in (("q_proj", (32, 32)),
                                                                                ("v_proj", (16, 32)))}

    def lotr(rank, **options):
        return rs.LotrConfig(rank=rank, target_modules=list(shapes), **options).num_trainable_parameters(shapes)

    joint = lotr(8) - lotr(8, basis="b") + 2 * lotr(8, basis="b")  # one basis, two tasks' cores
    chosen = separate_rank(part, 8, _runs(out, part))
    assert all(abs(2 * lotr(chosen) - joint) <= abs(2 * lotr(r) - joint) for r in range(1, 17))


def test_the_report_answers_how_few_parameters_keep_95_percent(study):
    part, out, _ = study
    text, figure = compression_section(out / part.name)
    assert "| lora | 2 |" in text and "| joint | 8 |" in text and "| separate |" in text
    assert "| joint, recovered at 0.05 | 2 |" in text and "| joint, a basis per module | 4 |" in text
    assert "keep 95 % of the LoRAs' average exact match" in text and figure is not None


def test_a_set_scored_on_only_some_tasks_says_so_and_answers_nothing(study, tmp_path):
    part, out, records = study
    folder = shutil.copytree(out / part.name, tmp_path / part.name)
    (folder / "joint-r2-recovered-sort.json").unlink()  # a part still running: one task of the set scored
    for name in ("lora-add", "lora-sort", "joint-r2-recovered-add"):  # every set but this one falls short of 95 %
        record = {**records[name], "exact_match": 1.0 if name.startswith("lora") else 0.96}
        (folder / f"{name}.json").write_text(json.dumps(record))
    text, _ = compression_section(folder)
    assert "| joint, recovered | 2 |" in text and "96.0 (1 of 2 tasks)" in text
    assert "- joint, recovered: not measured on every task yet" in text
    assert "- joint, recovered at 0.05: no rank measured keeps 95 %" in text


def test_a_lora_whose_run_is_gone_is_trained_again_and_must_score_as_recorded(study, tmp_path):
    part, out, records = study
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(_runs(copy, part)["add"])  # the runs are not kept with the records
    said = []
    run_compression(part, copy, quiet=True, say=said.append)
    assert "lora-add: trained again, scores as recorded" in said
    assert json.loads((copy / part.name / "lora-add.json").read_text()) == records["lora-add"]  # the first's, kept
    assert (_runs(copy, part)["add"] / "metrics.json").is_file()

    shutil.rmtree(_runs(copy, part)["sort"])
    metrics = records["lora-sort"]["metrics"]
    tampered = {**records["lora-sort"], "metrics": {**metrics, "sort": {**metrics["sort"], "exact_match": 2}}}
    (copy / part.name / "lora-sort.json").write_text(json.dumps(tampered))
    with pytest.raises(rs.RankshareError, match="the LoRA for sort was trained again"):
        run_compression(part, copy, quiet=True, say=lambda text: None)
    assert not _runs(copy, part)["sort"].exists()  # moved aside: a rerun trains it again and stops again
    assert (copy / ".runs" / part.name / "lora-sort-mismatched" / "metrics.json").is_file()


def test_a_retraining_stopped_before_its_check_is_checked_on_the_next_run(study, tmp_path):
    part, out, records = study
    copy = shutil.copytree(out, tmp_path / "out")
    metrics = records["lora-add"]["metrics"]
    tampered = {**records["lora-add"], "metrics": {**metrics, "add": {**metrics["add"], "exact_match": 2}}}
    (copy / part.name / "lora-add.json").write_text(json.dumps(tampered))
    run_compression(part, copy, quiet=True, say=lambda text: None)  # a run that was never retrained is not checked
    _runs(copy, part)["add"].with_name("lora-add.unchecked").touch()  # retrained, then stopped before the check
    with pytest.raises(rs.RankshareError, match="the LoRA for add was trained again"):
        run_compression(part, copy, quiet=True, say=lambda text: None)
    assert not _runs(copy, part)["add"].with_name("lora-add.unchecked").exists()


def test_a_recovery_whose_joint_run_is_gone_fits_that_rank_again_and_keeps_its_records(study, tmp_path):
    part, out, records = study
    copy = shutil.copytree(out, tmp_path / "out")
    shutil.rmtree(copy / ".runs" / part.name / "joint-r2")
    (copy / part.name / "joint-r2-recovered-add.json").unlink()
    said = []
    run_compression(part, copy, quiet=True, say=said.append)
    assert [line.split(":")[0] for line in said] == ["joint-r2-recovered-add"]  # the fit alone is not scored again
    assert json.loads((copy / part.name / "joint-r2-add.json").read_text()) == records["joint-r2-add"]
    assert (copy / ".runs" / part.name / "joint-r2-recovered" / "add" / "adapter").is_dir()


def _runs(out, part):
    return {task: out / ".runs" / part.name / f"lora-{task}" for task in part.tasks}
