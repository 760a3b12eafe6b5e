"""``skills``: a multi-task instruction set, generated from the seed (nothing is downloaded).

Six synthetic tasks, each needing a different skill and having exactly one correct answer, plus two
classification corpora phrased as instructions. Every prompt says how to answer, so that exact match is fair,
and every response is short and canonical:

* ``add`` — "What is 482 + 157? Answer with the number only." → ``639``
* ``reverse`` — "Reverse the order of this list: sun, cat, cat, red, box, cat, dog, sun, sun, red. Answer with the
  reversed list, separated by commas." → ``red, sun, sun, dog, cat, box, red, cat, cat, sun``
* ``sort`` — "Sort these numbers from smallest to largest: 42, 7, 93, 15, 7. Answer with the sorted numbers,
  separated by commas." → ``7, 7, 15, 42, 93``
* ``count`` — "How many times does the letter c appear in this list: a, c, f, c, b, d, e, a? Answer with the
  number only." → ``2``
* ``date`` — "What is the date 3 days after 2024-02-27? Answer with the date only, in the form YYYY-MM-DD." →
  ``2024-03-01`` (date arithmetic: months of different lengths, leap years)
* ``time`` — "Write the time 14:05:09 in 12-hour format. Answer with the time only." → ``2:05:09 PM``
* ``news`` — "{the first NEWS_WORDS words of a BBC News article} ...", a blank line, then "Which topic is this
  news article about: business, entertainment, politics, sports or tech? Answer with one word." → the topic
* ``sentiment`` — "{a tweet about self-driving cars}", a blank line, then "Is the sentiment of this tweet
  negative, neutral or positive? Answer with one word." → ``negative``, ``neutral`` or ``positive``

The news and sentiment prompts put the question after the text: a prompt too long for the model is cut from
the left, which then loses text but keeps the question.

Each synthetic task has ``TRAIN_SIZE`` training, ``EVAL_SIZE`` validation and ``EVAL_SIZE`` test examples; news
and sentiment take at most as many from the splits of the built-in corpora (``data.builtin_splits``).
How hard a synthetic task is is set by the constants beside its generator.

Guarantees, for every seed: train, validation and test never share a prompt, and no prompt is twice in one
split (prompts compared after collapsing whitespace and case); each split is in random order (news and
sentiment: in the built-ins' stratified order), so a prefix is a fair sample. The same seed gives the same
examples byte for byte (each task draws from its own ``random.Random(f"{seed}/{task}")``), another seed gives
other examples.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable

from ..errors import RankshareError
from .examples import Instruction

TRAIN_SIZE = 2000  # training examples per task
EVAL_SIZE = 200  # validation examples per task, and as many test examples
_MAX_DRAWS = 20  # a task may draw this many times the examples it needs before it gives up

Split = tuple[list[str], list[list[Instruction]]]  # (no label names: [], [train, validation, test])
Generator = Callable[[random.Random], tuple[str, str]]  # rng -> (prompt, response)


# --- the synthetic tasks: one generator each, its difficulty in the constants above it -----------------------

ADD_DIGITS = 3  # both addends have this many digits


def add(rng: random.Random) -> tuple[str, str]:
    a, b = (rng.randrange(10 ** (ADD_DIGITS - 1), 10**ADD_DIGITS) for _ in range(2))
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


REVERSE_LENGTH = 10  # words in the list (drawn with repetition)
# Few distinct words, so that most words repeat and the answer cannot be copied word by word: the model must keep
# track of positions. 30 words, 5 in a list: 98 % after 300 LoRA steps; 9: 96 %.
REVERSE_WORDS = ("cat", "dog", "sun", "red", "box")


def reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.choices(REVERSE_WORDS, k=REVERSE_LENGTH)
    prompt = f"Reverse the order of this list: {', '.join(words)}. Answer with the reversed list, separated by commas."
    return prompt, ", ".join(reversed(words))


SORT_LENGTH = 5  # numbers in the list (drawn with repetition)
SORT_MAX = 99  # numbers are drawn from 1..SORT_MAX


def sort(rng: random.Random) -> tuple[str, str]:
    numbers = rng.choices(range(1, SORT_MAX + 1), k=SORT_LENGTH)
    prompt = (f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}. Answer with the sorted "
              "numbers, separated by commas.")
    return prompt, ", ".join(map(str, sorted(numbers)))


COUNT_LENGTH = 6  # letters in the list; 8 letters: 24 % after 300 LoRA steps
COUNT_LETTERS = "abcdef"  # the letters drawn from; fewer letters give higher counts


def count(rng: random.Random) -> tuple[str, str]:
    letters = rng.choices(COUNT_LETTERS, k=COUNT_LENGTH)
    letter = rng.choice(COUNT_LETTERS)  # it may be missing from the list: then the answer is 0
    prompt = (f"How many times does the letter {letter} appear in this list: {', '.join(letters)}? Answer with the "
              "number only.")
    return prompt, str(letters.count(letter))


DATE_YEARS = (1950, 2049)  # first and last year of the dates
DATE_MAX_DAYS = 3  # the date asked for is 1..DATE_MAX_DAYS days later (9 days: 14 % after 300 LoRA steps)


def date(rng: random.Random) -> tuple[str, str]:
    start = datetime.date(rng.randint(*DATE_YEARS), 1, 1) + datetime.timedelta(days=rng.randrange(365))
    days = rng.randint(1, DATE_MAX_DAYS)
    later = start + datetime.timedelta(days=days)
    prompt = (f"What is the date {days} day{'s' if days > 1 else ''} after {start.isoformat()}? Answer with the date "
              "only, in the form YYYY-MM-DD.")
    return prompt, later.isoformat()


def time(rng: random.Random) -> tuple[str, str]:
    hour, minute, second = rng.randrange(24), rng.randrange(60), rng.randrange(60)
    twelve = f"{(hour - 1) % 12 + 1}:{minute:02d}:{second:02d} {'AM' if hour < 12 else 'PM'}"
    prompt = f"Write the time {hour:02d}:{minute:02d}:{second:02d} in 12-hour format. Answer with the time only."
    return prompt, twelve


SYNTHETIC: dict[str, Generator] = {
    "add": add,
    "reverse": reverse,
    "sort": sort,
    "count": count,
    "date": date,
    "time": time,
}


# --- the corpora phrased as instructions ---------------------------------------------------------------------

NEWS_WORDS = 12  # the article's first words kept in the prompt (its title and a little more); 35 words: 90 %


def _news_prompt(text: str, labels: list[str]) -> str:
    words = text.split()
    excerpt = " ".join(words[:NEWS_WORDS]) + (" ..." if len(words) > NEWS_WORDS else "")
    return f"{excerpt}\n\nWhich topic is this news article about: {_either(labels)}? Answer with one word."


def _sentiment_prompt(text: str, labels: list[str]) -> str:
    return f"{text}\n\nIs the sentiment of this tweet {_either(labels)}? Answer with one word."


def _either(labels: list[str]) -> str:
    return f"{', '.join(labels[:-1])} or {labels[-1]}"


PHRASED: dict[str, Callable[[str, list[str]], str]] = {"news": _news_prompt, "sentiment": _sentiment_prompt}


# --- filling the splits --------------------------------------------------------------------------------------


def skill_tasks(seed: int, corpora: dict[str, tuple[list[str], list[list]]]) -> dict[str, Split]:
    """Task name -> ([], [train, validation, test]) for every task of the module docstring; ``corpora`` are the
    built-in classification tasks as data.py splits them (name -> (label names, [train, validation, test]))."""
    return {**synthetic_tasks(seed), **phrased_tasks(corpora)}


def synthetic_tasks(seed: int) -> dict[str, Split]:
    """The synthetic tasks: each draws distinct prompts; the first go to test, the next to validation, the rest
    to train."""
    tasks = {}
    for task, generate in SYNTHETIC.items():
        rng = random.Random(f"{seed}/{task}")
        needed = TRAIN_SIZE + 2 * EVAL_SIZE
        drawn: dict[str, Instruction] = {}  # normalised prompt -> example, in the order drawn
        for _ in range(_MAX_DRAWS * needed):
            prompt, response = generate(rng)
            drawn.setdefault(_key(prompt), Instruction.of(prompt, response, task))
            if len(drawn) == needed:
                break
        else:
            raise RankshareError(
                f"The skills task '{task}' gave only {len(drawn)} distinct prompts in {_MAX_DRAWS * needed} draws, "
                f"fewer than the {needed} it needs; its difficulty settings allow too few: widen them."
            )
        examples = list(drawn.values())
        tasks[task] = ([], [examples[2 * EVAL_SIZE :], examples[EVAL_SIZE : 2 * EVAL_SIZE], examples[:EVAL_SIZE]])
    return tasks


def phrased_tasks(corpora: dict[str, tuple[list[str], list[list]]]) -> dict[str, Split]:
    """News and sentiment: the built-in splits (disjoint, each in an order whose prefixes keep the label balance),
    capped and phrased."""
    tasks = {}
    for task, phrase in PHRASED.items():
        labels, (train, validation, test) = corpora[task]
        given = [train[:TRAIN_SIZE], validation[:EVAL_SIZE], test[:EVAL_SIZE]]
        # Distinct texts can give one prompt once cut short; keep such a prompt once, in test before validation
        # before train, as the synthetic tasks do.
        seen: set[str] = set()
        phrased: list[list[Instruction]] = [[], [], []]
        for index in (2, 1, 0):
            for example in given[index]:
                prompt = phrase(example.text, labels)
                if _key(prompt) not in seen:
                    seen.add(_key(prompt))
                    phrased[index].append(Instruction.of(prompt, labels[example.label], task))
        tasks[task] = ([], phrased)
    return tasks


def _key(prompt: str) -> str:
    """A prompt as compared for duplicates: whitespace collapsed, lower case (as instructions.py compares them)."""
    return " ".join(prompt.split()).lower()
