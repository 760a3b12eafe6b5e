"""The generated ``skills`` instruction set: deterministic by seed, disjoint splits, correct answers."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

import pytest

from rankshare.finetune import skills
from rankshare.finetune.data import Instruction, builtin_splits, load_data
from rankshare.finetune.skills import skill_tasks

SYNTHETIC = ("add", "reverse", "sort", "count", "date", "time")


@pytest.fixture(scope="module")
def by_seed() -> dict[int, dict]:
    return {seed: skill_tasks(seed, builtin_splits(seed)) for seed in (0, 1)}


def _key(prompt: str) -> str:
    return " ".join(prompt.split()).lower()


def _flat(tasks: dict) -> list[tuple[str, int, tuple, str]]:
    return [(task, index, e.turns, e.task) for task, (_, splits) in tasks.items()
            for index, split in enumerate(splits) for e in split]


def test_the_same_seed_gives_the_same_examples_and_another_seed_others(by_seed):
    assert _flat(skill_tasks(0, builtin_splits(0))) == _flat(by_seed[0])
    for task in by_seed[0]:
        prompts = [[e.prompt for e in split] for split in by_seed[0][task][1]]
        others = [[e.prompt for e in split] for split in by_seed[1][task][1]]
        assert all(a != b for a, b in zip(prompts, others)), task


# A digest of every synthetic example of seed 3, printed by the code run in this process and in another one.
DIGEST = """
import hashlib
from rankshare.finetune.skills import synthetic_tasks
flat = [(task, e.turns) for task, (_, splits) in synthetic_tasks(3).items() for split in splits for e in split]
print(hashlib.sha256(repr(flat).encode()).hexdigest())
"""


def test_the_synthetic_examples_do_not_depend_on_the_process():
    # String hashing is salted per process; another salt and another locale must not change a byte.
    env = {**os.environ, "PYTHONHASHSEED": "12345", "LC_ALL": "C"}
    other = subprocess.run([sys.executable, "-c", DIGEST], env=env, capture_output=True, text=True, check=True)
    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        exec(DIGEST, {})
    assert other.stdout.strip() == here.getvalue().strip()


@pytest.mark.parametrize("seed", [0, 1])
def test_no_prompt_is_in_two_splits_or_twice_in_one(by_seed, seed):
    tasks = by_seed[seed]
    assert set(SYNTHETIC) | {"news", "sentiment"} <= set(tasks)
    for task, (labels, splits) in tasks.items():
        assert labels == [] and len(splits) == 3
        keys = [[_key(e.prompt) for e in split] for split in splits]
        for split_keys in keys:
            assert split_keys and len(set(split_keys)) == len(split_keys), task
        train, validation, test = map(set, keys)
        assert not (train & validation or train & test or validation & test), task
        assert all(isinstance(e, Instruction) and e.task == task and e.response.strip() for s in splits for e in s)


def test_the_synthetic_tasks_have_their_full_sizes(by_seed):
    for task in SYNTHETIC:
        sizes = [len(split) for split in by_seed[0][task][1]]
        assert sizes == [skills.TRAIN_SIZE, skills.EVAL_SIZE, skills.EVAL_SIZE], task
    for task in ("news", "sentiment"):
        train, validation, test = by_seed[0][task][1]
        assert len(train) <= skills.TRAIN_SIZE and len(validation) <= skills.EVAL_SIZE >= len(test)


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def _list(prompt: str) -> list[str]:
    return re.search(r": (.*?)[.?] Answer", prompt).group(1).split(", ")


def _expected(task: str, prompt: str) -> str:
    """The answer recomputed from the prompt alone, with plain Python."""
    if task == "add":
        a, b = _numbers(re.search(r"What is (\d+ \+ \d+)\?", prompt).group(1))
        return str(a + b)
    if task == "reverse":
        return ", ".join(_list(prompt)[::-1])
    if task == "sort":
        return ", ".join(str(n) for n in sorted(int(n) for n in _list(prompt)))
    if task == "count":
        letter = re.search(r"the letter (\w) appear", prompt).group(1)
        return str(_list(prompt).count(letter))
    if task == "date":
        found = re.search(r"the date (\d+) days? after (\d{4})-(\d{2})-(\d{2})", prompt)
        days, year, month, day = map(int, found.groups())
        lengths = [31, 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28, 31, 30, 31, 30, 31, 31, 30,
                   31, 30, 31]
        day += days
        if day > lengths[month - 1]:  # at most 9 days later: one month's end at most
            day, month = day - lengths[month - 1], month + 1
            if month == 13:
                month, year = 1, year + 1
        return f"{year:04d}-{month:02d}-{day:02d}"
    if task == "time":
        hour, minute, second = re.search(r"the time (\d{2}):(\d{2}):(\d{2}) in", prompt).groups()
        hour = int(hour)
        shown = {0: 12, **{h: h for h in range(1, 13)}, **{h: h - 12 for h in range(13, 24)}}[hour]
        return f"{shown}:{minute}:{second} {'PM' if hour >= 12 else 'AM'}"
    raise AssertionError(task)


def test_every_synthetic_response_is_the_one_correct_answer(by_seed):
    for task in SYNTHETIC:
        _, (train, validation, test) = by_seed[0][task]
        for example in train[:100] + validation[:50] + test[:50]:
            assert example.response == _expected(task, example.prompt), example
        assert "Answer with" in example.prompt  # the prompt states the answer format


def test_the_synthetic_difficulty_follows_the_constants(by_seed):
    add = [_numbers(e.prompt) for e in by_seed[0]["add"][1][0][:50]]
    assert all(len(str(n)) == skills.ADD_DIGITS for pair in add for n in pair)
    assert all(len(_list(e.prompt)) == skills.REVERSE_LENGTH for e in by_seed[0]["reverse"][1][0][:50])
    assert all(len(_list(e.prompt)) == skills.SORT_LENGTH for e in by_seed[0]["sort"][1][0][:50])
    assert all(len(_list(e.prompt)) == skills.COUNT_LENGTH for e in by_seed[0]["count"][1][0][:50])
    days = [int(re.search(r"date (\d+) days? after", e.prompt).group(1)) for e in by_seed[0]["date"][1][0]]
    assert set(days) == set(range(1, skills.DATE_MAX_DAYS + 1))


def test_a_setting_too_narrow_for_distinct_prompts_is_an_error_not_a_hang(monkeypatch):
    monkeypatch.setattr(skills, "SORT_MAX", 3)  # lists of 5 numbers of 1..3 give 3**5 = 243 distinct prompts
    with pytest.raises(ValueError, match="'sort' gave only 243 distinct prompts"):
        skills.synthetic_tasks(0)


def test_the_corpora_become_questions_answered_by_their_label_names(by_seed):
    news, sentiment = (by_seed[0][task][1] for task in ("news", "sentiment"))
    topics = {"business", "entertainment", "politics", "sports", "tech"}
    for split in news:
        for example in split:
            assert example.response in topics
            text, question = example.prompt.rsplit("\n\n", 1)
            assert question.startswith("Which topic is this news article about:") and "one word" in question
            assert len(text.split()) <= skills.NEWS_WORDS + 1  # + the "..." of a cut article
    assert {e.response for e in sentiment[0]} == {"negative", "neutral", "positive"}
    assert all(e.prompt.endswith("negative, neutral or positive? Answer with one word.") for e in sentiment[2])


def test_load_data_gives_capped_instruction_splits():
    splits = load_data("skills", seed=0, max_train=50, max_eval=10)
    assert splits.instructions
    assert splits.tasks == {task: [] for task in (*SYNTHETIC, "news", "sentiment")}
    for task in splits.tasks:
        counts = [sum(e.task == task for e in split) for split in (splits.train, splits.validation, splits.test)]
        assert counts == [50, 10, 10], task
    # The training set is shuffled across the tasks, not one task after another.
    assert len({e.task for e in splits.train[:40]}) >= 5


def test_some_tasks_of_the_skills_set_are_named_after_a_colon():
    from rankshare.errors import RankshareError
    from rankshare.finetune.data import load_data

    whole = load_data("skills", max_train=5, max_eval=3)
    some = load_data("skills:add+sort", max_train=5, max_eval=3)
    assert list(some.tasks) == ["add", "sort"]
    assert some.test == [e for e in whole.test if e.task in ("add", "sort")]
    with pytest.raises(RankshareError, match="unknown: \\['multiply'\\]"):
        load_data("skills:add+multiply")
