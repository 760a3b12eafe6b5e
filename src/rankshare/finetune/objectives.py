"""What the model is trained to do with the data: a batch, its loss, and its evaluation, per objective.

- ``SequenceClassification``: an encoder with one classification head over the labels of all tasks;
  each example's logits are restricted to its own task's labels (in the loss and at prediction).
- ``TextToLabel``: a causal LM reads ``text`` and writes the label's name; it predicts the label whose
  name is most likely (summed log-probabilities) among its task's labels.
- ``LanguageModelling``: next-token prediction on the texts; reported as perplexity.
- ``InstructionTuning`` (``sft``): a causal LM learns each instruction's response; the loss counts the
  response's tokens alone. Evaluated by greedy generation, scored by exact match, and by the response's loss.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import RankshareError
from .data import DataSplits, Example, Instruction
from .metrics import classification_metrics

IGNORE = -100


@dataclass
class Batch:
    inputs: dict  # keyword arguments for the model
    examples: list[Example]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def _attention_mask(rows: list[list[int]]) -> torch.Tensor:
    return _pad([[1] * len(r) for r in rows], 0)


def padded(rows: list[list[int]], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """Token rows padded on the right: ``input_ids`` and ``attention_mask``, (B, longest row)."""
    return {"input_ids": _pad(rows, pad_token_id).to(device), "attention_mask": _attention_mask(rows).to(device)}


def left_padded(rows: list[list[int]], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """Token rows padded on the left, so that every row continues from its own last token: ``input_ids`` and
    ``attention_mask``, (B, longest row)."""
    width = max(map(len, rows))
    return {"input_ids": torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], device=device),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)}


def likeliest(pairs: list[tuple[int, int]], scores: list[float]) -> dict[int, int]:
    """Each row's candidate of highest score, from the ``(row, candidate)`` pairs and their scores (first on ties)."""
    best: dict[int, tuple[float, int]] = {}
    for (row, k), score in zip(pairs, scores):
        if row not in best or score > best[row][0]:
            best[row] = (score, k)
    return {row: k for row, (_, k) in best.items()}


def token_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens ≤ t) at every labelled position, 0 elsewhere: (B, T-1)."""
    logits = logits[:, :-1].float()  # (B, T-1, V)
    # cross_entropy picks each target's log-probability without a (B, T, V) log-softmax; 0 where ignored
    return -F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none")


class Objective:
    # A causal LM's prompt is followed by more text, so it takes no end-of-sequence tokens of its own.
    special_tokens = True

    def __init__(self, tokenizer, tasks: dict[str, list[str]], max_length: int) -> None:
        self.tokenizer = tokenizer
        self.tasks = tasks
        self.max_length = max_length
        # Called as observer(attention_mask, tasks) before each evaluation forward (router statistics).
        self.observer = None

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        ids = self.tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=self.special_tokens)
        return ids["input_ids"]

    def forward(self, model, inputs: dict, examples: list[Example]):
        if self.observer is not None:
            self.observer(inputs["attention_mask"], [e.task for e in examples])
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])

    def batch(self, examples: list[Example], device) -> Batch:
        raise NotImplementedError

    def loss(self, model, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def tally(self, model, examples: list[Example], batch_size: int, device, progress=None) -> dict:
        """Raw counts over ``examples`` (picklable), so that the tallies of several processes can be pooled."""
        raise NotImplementedError

    def summarize(self, tallies: list[dict]) -> dict:
        """Metrics per task and on average, from the pooled tallies."""
        labels, predictions = defaultdict(list), defaultdict(list)
        for tally in tallies:
            for task in tally["labels"]:
                labels[task] += tally["labels"][task]
                predictions[task] += tally["predictions"][task]
        result = {t: classification_metrics(labels[t], predictions[t], len(self.tasks[t]))
                  for t in self.tasks if labels[t]}
        scored = list(result.values())
        result["average"] = {
            "accuracy": sum(m["accuracy"] for m in scored) / len(scored),
            "macro_f1": sum(m["macro_f1"] for m in scored) / len(scored),
            "examples": sum(m["examples"] for m in scored),
        }
        return result

    def _token_log_likelihoods(self, model, inputs: dict, examples: list[Example]) -> torch.Tensor:
        return token_log_likelihoods(self.forward(model, inputs, examples).logits, inputs["labels"])


class SequenceClassification(Objective):
    def __init__(self, tokenizer, tasks, max_length) -> None:
        super().__init__(tokenizer, tasks, max_length)
        self.offsets, total = {}, 0
        for task, labels in tasks.items():
            self.offsets[task], total = total, total + len(labels)
        self.num_labels = total

    def _task_mask(self, examples: list[Example], device) -> torch.Tensor:
        mask = torch.zeros(len(examples), self.num_labels, dtype=torch.bool, device=device)
        for row, example in enumerate(examples):
            start = self.offsets[example.task]
            mask[row, start : start + len(self.tasks[example.task])] = True
        return mask

    def batch(self, examples, device) -> Batch:
        rows = self.encode([e.text for e in examples], self.max_length)
        return Batch(padded(rows, self.tokenizer.pad_token_id, device), examples)

    def label_of(self, logits: torch.Tensor, task: str) -> int:
        """The likeliest of ``task``'s labels (an index into them) from one row of the head's logits (num_labels,)."""
        start = self.offsets[task]
        return int(logits[start : start + len(self.tasks[task])].argmax())

    def _task_logits(self, model, batch: Batch) -> torch.Tensor:
        logits = self.forward(model, batch.inputs, batch.examples).logits.float()
        return logits.masked_fill(~self._task_mask(batch.examples, logits.device), -torch.inf)

    def loss(self, model, batch) -> torch.Tensor:
        targets = torch.tensor([self.offsets[e.task] + e.label for e in batch.examples],
                               device=batch.inputs["input_ids"].device)
        return F.cross_entropy(self._task_logits(model, batch), targets)

    @torch.no_grad()
    def tally(self, model, examples, batch_size, device, progress=None) -> dict:
        labels, predictions = defaultdict(list), defaultdict(list)
        for start in range(0, len(examples), batch_size):
            batch = self.batch(examples[start : start + batch_size], device)
            for example, predicted in zip(batch.examples, self._task_logits(model, batch).argmax(-1).tolist()):
                labels[example.task].append(example.label)
                predictions[example.task].append(predicted - self.offsets[example.task])
            if progress:
                progress(len(batch.examples))
        return {"labels": dict(labels), "predictions": dict(predictions)}


class TextToLabel(Objective):
    """Prompt ``{text}\\n{task}:`` followed by `` {label name}`` and the end-of-sequence token."""

    special_tokens = False

    def __init__(self, tokenizer, tasks, max_length) -> None:
        super().__init__(tokenizer, tasks, max_length)
        self.answers = {task: [self._ids(" " + name) for name in names] for task, names in tasks.items()}
        self.suffixes = {task: self._ids(f"\n{task}:") for task in tasks}
        longest = max(len(a) for answers in self.answers.values() for a in answers) + 1
        self.text_budget = max_length - longest - max(len(s) for s in self.suffixes.values())
        if self.text_budget < 8:
            raise RankshareError(
                f"--max-length {max_length} leaves no room for text beside the prompt and label names; "
                f"use --max-length {max_length - self.text_budget + 8} or more."
            )

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompts(self, texts: list[str], tasks: list[str]) -> list[list[int]]:
        """``{text}\\n{task}:`` as token ids, the text cut to leave room for the longest label."""
        return [ids + self.suffixes[task] for ids, task in zip(self.encode(texts, self.text_budget), tasks)]

    def sequences(self, prompts, answers, device) -> dict:
        """Each prompt followed by its answer, padded; ``labels`` marks the answer's tokens alone."""
        rows = [p + a for p, a in zip(prompts, answers)]
        labels = [[IGNORE] * len(p) + a for p, a in zip(prompts, answers)]
        return {**padded(rows, self.tokenizer.pad_token_id, device), "labels": _pad(labels, IGNORE).to(device)}

    def batch(self, examples, device) -> Batch:
        answers = [self.answers[e.task][e.label] + [self.tokenizer.eos_token_id] for e in examples]
        prompts = self.prompts([e.text for e in examples], [e.task for e in examples])
        return Batch(self.sequences(prompts, answers, device), examples)

    def loss(self, model, batch) -> torch.Tensor:
        return model(**batch.inputs).loss

    @torch.no_grad()
    def tally(self, model, examples, batch_size, device, progress=None) -> dict:
        # Score every (example, candidate label) pair by the summed log-probability of the label's tokens.
        pairs = [(i, k) for i, e in enumerate(examples) for k in range(len(self.tasks[e.task]))]
        prompts = self.prompts([e.text for e in examples], [e.task for e in examples])
        scores = torch.empty(len(pairs))
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            answers = [self.answers[examples[i].task][k] for i, k in chunk]
            inputs = self.sequences([prompts[i] for i, _ in chunk], answers, device)
            chunk_examples = [examples[i] for i, _ in chunk]
            log_likelihoods = self._token_log_likelihoods(model, inputs, chunk_examples)
            scores[start : start + len(chunk)] = log_likelihoods.sum(-1).cpu()
            if progress:  # examples whose last candidate was scored here (an example's pairs may span two chunks)
                progress(sum(k == len(self.tasks[examples[i].task]) - 1 for i, k in chunk))
        best = likeliest(pairs, scores.tolist())
        labels, predictions = defaultdict(list), defaultdict(list)
        for i, example in enumerate(examples):
            labels[example.task].append(example.label)
            predictions[example.task].append(best[i])
        return {"labels": dict(labels), "predictions": dict(predictions)}


class LanguageModelling(Objective):
    def batch(self, examples, device) -> Batch:
        rows = self.encode([e.text for e in examples], self.max_length)
        ids = _pad(rows, self.tokenizer.pad_token_id)
        mask = _attention_mask(rows)
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                  "labels": ids.masked_fill(mask == 0, IGNORE).to(device)}
        return Batch(inputs, examples)

    def loss(self, model, batch) -> torch.Tensor:
        return model(**batch.inputs).loss

    @torch.no_grad()
    def tally(self, model, examples, batch_size, device, progress=None) -> dict:
        nll, tokens = defaultdict(float), defaultdict(int)
        for start in range(0, len(examples), batch_size):
            batch = self.batch(examples[start : start + batch_size], device)
            per_token = self._token_log_likelihoods(model, batch.inputs, batch.examples)  # (B, T-1), 0 where ignored
            counted = (batch.inputs["labels"][:, 1:] != IGNORE).sum(-1)
            for example, total, count in zip(batch.examples, per_token.sum(-1).tolist(), counted.tolist()):
                nll[example.task] -= total
                tokens[example.task] += count
            if progress:
                progress(len(batch.examples))
        return {"nll": dict(nll), "tokens": dict(tokens)}

    def summarize(self, tallies: list[dict]) -> dict:
        nll, tokens = defaultdict(float), defaultdict(int)
        for tally in tallies:
            for task in tally["nll"]:
                nll[task] += tally["nll"][task]
                tokens[task] += tally["tokens"][task]
        result = {t: {"perplexity": math.exp(nll[t] / tokens[t]), "loss": nll[t] / tokens[t], "tokens": tokens[t]}
                  for t in nll}
        all_nll, all_tokens = sum(nll.values()), sum(tokens.values())
        result["average"] = {"perplexity": math.exp(all_nll / all_tokens), "loss": all_nll / all_tokens,
                             "tokens": all_tokens}
        return result


# The answer of the conversation that turn_end_id renders: text that no template writes after an answer.
_PROBE_ANSWER = "rankshare-probe"


def end_token_ids(tokenizer, model) -> list[int]:
    """The tokens that end an answer, each once, in this order: the model's own (``generation_config.eos_token_id``,
    one or a list), the tokenizer's end of sequence, and the token that closes the assistant's turn in the chat
    template. Passing one of them to ``generate`` as ``eos_token_id`` would replace the others, and a model that
    closes its turn with ``<|im_end|>`` or ``<|eot_id|>`` would then write until ``max_new_tokens``."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [*([own] if isinstance(own, int) else own or []), tokenizer.eos_token_id, turn_end_id(tokenizer)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def turn_end_id(tokenizer) -> int | None:
    """The special token that closes an assistant turn in the tokenizer's chat template; None without a template,
    or where the template closes a turn with plain text alone.

    The template is asked rather than searched for known names (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``): a one-turn conversation is rendered with a probe answer, and the first special token in
    what follows the answer is the one the model was trained to write after its answer. Tokens before the answer
    (role headers such as ``<|start_header_id|>``) are not looked at, and a template that adds a system turn or a
    beginning of sequence changes nothing after the answer."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    whole = tokenizer.apply_chat_template(turns, tokenize=False)
    if _PROBE_ANSWER not in whole:  # a template that leaves out or rewrites the answer shows no end of its turn
        return None
    after = whole[whole.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER):]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return next((i for i in tokenizer(after, add_special_tokens=False)["input_ids"] if i in special), None)


def normalised(text: str) -> str:
    """An answer as exact match compares it: whitespace collapsed and trimmed, lower case."""
    return " ".join(text.split()).lower()


class InstructionTuning(Objective):
    """A causal LM learns to answer: each instruction's prompt, then its response and the end of its turn.

    The layout is the tokenizer's chat template when it has one (``chat``): the turns before the answer
    rendered with the generation prompt, then the rest of the rendered conversation as the response.
    Without a template (``plain``) it is ``{prompt}\n{response}<eos>``, the prompt's turns one per line. Only the
    response's tokens carry loss. A prompt too long for ``max_length`` loses tokens from its left, so that the
    response stays whole; an example whose response alone does not fit is left out (``fit_splits`` counts both).

    Evaluation generates greedily (KV cache, left padding) up to ``max_new_tokens`` or an ``end_token_ids`` token, and
    scores exact match of the answer after ``normalised`` (whitespace collapsed, lower case), and the
    response's mean token loss; the first ``SAMPLES`` examples of each task keep their generation.
    """

    special_tokens = False
    SAMPLES = 3

    def __init__(self, tokenizer, tasks, max_length, max_new_tokens: int = 32, layout: str = "auto") -> None:
        super().__init__(tokenizer, tasks, max_length)
        self.max_new_tokens = max_new_tokens
        if layout not in ("auto", "chat", "plain"):
            raise RankshareError(f"Unknown prompt layout {layout!r}; use auto, chat or plain.")
        if layout == "chat" and not getattr(tokenizer, "chat_template", None):
            raise RankshareError("The tokenizer has no chat template; use the plain prompt layout.")
        self.chat = layout == "chat" or (layout == "auto" and bool(getattr(tokenizer, "chat_template", None)))

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_text(self, context: tuple[tuple[str, str], ...]) -> str:
        """The turns before an answer, as the model reads them before it answers."""
        if not self.chat:
            return "\n".join(content for _, content in context) + "\n"
        turns = [{"role": role, "content": content} for role, content in context]
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    def render(self, example: Instruction) -> tuple[str, str]:
        """(prompt, response) as text: their concatenation is the whole training sequence."""
        prompt = self.prompt_text(example.context)
        if not self.chat:
            return prompt, example.response + self.tokenizer.eos_token
        turns = [{"role": role, "content": content} for role, content in example.turns]
        whole = self.tokenizer.apply_chat_template(turns, tokenize=False)
        if not whole.startswith(prompt):
            raise RankshareError("The tokenizer's chat template renders a conversation differently from its prompt "
                                 "alone, so the answer cannot be told apart; use the plain prompt layout.")
        return prompt, whole[len(prompt):]

    def encode_pair(self, example: Instruction) -> tuple[list[int], list[int], bool] | None:
        """(prompt ids, response ids, whether the prompt was cut) within ``max_length``; None if the response
        alone leaves no room for a prompt token."""
        prompt, response = (self._ids(text) for text in self.render(example))
        room = self.max_length - len(response)
        if room < 1:
            return None
        return prompt[-room:], response, len(prompt) > room

    def prompt_ids(self, context: tuple[tuple[str, str], ...]) -> list[int]:
        """The prompt an answer is generated from; longer than ``max_length - 1`` tokens, cut from the left."""
        return self._ids(self.prompt_text(context))[-max(1, self.max_length - 1):]

    def fit_splits(self, splits: DataSplits) -> tuple[DataSplits, dict]:
        """The splits without the examples whose response does not fit, and per split how many prompts were cut
        and how many examples were left out."""
        kept, counts = {}, {}
        for name in ("train", "validation", "test"):
            examples, tally = [], Counter(cut=0, skipped=0)
            for example in getattr(splits, name):
                pair = self.encode_pair(example)
                if pair is None:
                    tally["skipped"] += 1
                    continue
                tally["cut"] += pair[2]
                examples.append(example)
            kept[name], counts[name] = examples, dict(tally)
        return DataSplits(splits.tasks, kept["train"], kept["validation"], kept["test"]), counts

    def sequences(self, examples: list[Instruction], device) -> dict:
        pairs = [self.encode_pair(e) for e in examples]
        rows = [p + r for p, r, _ in pairs]
        labels = [[IGNORE] * len(p) + r for p, r, _ in pairs]
        return {**padded(rows, self.tokenizer.pad_token_id, device), "labels": _pad(labels, IGNORE).to(device)}

    def batch(self, examples, device) -> Batch:
        return Batch(self.sequences(examples, device), examples)

    def loss(self, model, batch) -> torch.Tensor:
        # The mean over the response tokens of the whole batch, as the model computes it from the labels.
        return model(**batch.inputs).loss

    def generate(self, model, contexts: list[tuple[tuple[str, str], ...]], device, **options) -> list[str]:
        """Each conversation's answer, generated from its prompt: greedy unless ``options`` say otherwise (they go
        to ``model.generate``: ``do_sample``, ``temperature``, ``adapter_names``, ``streamer``, ...)."""
        return self.answer(model, [self.prompt_ids(context) for context in contexts], device, **options)

    def answer(self, model, prompts: list[list[int]], device, **options) -> list[str]:
        """``generate`` from prompts already laid out as token ids (by this objective or another of the same
        tokenizer). Generation stops at any of ``end_token_ids``, and each answer is cut at the first of them:
        decoding skips special tokens only, and a model's own end token need not be one."""
        ends = end_token_ids(self.tokenizer, model)
        inputs = left_padded(prompts, self.tokenizer.pad_token_id, device)
        options = {"do_sample": False, **options}
        output = model.generate(**inputs, max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                eos_token_id=ends, **options)
        answers = []
        for row in output[:, inputs["input_ids"].shape[1]:].tolist():
            cut = next((i for i, token in enumerate(row) if token in ends), len(row))
            answers.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
        return answers

    def prompt_batch(self, contexts: list[tuple[tuple[str, str], ...]], device) -> dict[str, torch.Tensor]:
        """The prompts padded on the left, so that every row's answer continues from its own last token."""
        return left_padded([self.prompt_ids(context) for context in contexts], self.tokenizer.pad_token_id, device)

    @torch.no_grad()
    def tally(self, model, examples, batch_size, device, progress=None) -> dict:
        matches, counts, nll, tokens = Counter(), Counter(), defaultdict(float), Counter()
        samples = defaultdict(list)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            inputs = self.sequences(chunk, device)
            per_token = self._token_log_likelihoods(model, inputs, chunk)  # (B, T-1), 0 where ignored
            counted = (inputs["labels"][:, 1:] != IGNORE).sum(-1)
            if self.observer is not None:  # the routing recorded is over the examples' own tokens only
                self.observer(None, [])
            answers = self.generate(model, [e.context for e in chunk], device)
            for example, answer, total, count in zip(chunk, answers, per_token.sum(-1).tolist(), counted.tolist()):
                expected = example.response
                matches[example.task] += normalised(answer) == normalised(expected)
                counts[example.task] += 1
                nll[example.task] -= total
                tokens[example.task] += count
                if len(samples[example.task]) < self.SAMPLES:
                    samples[example.task].append({"prompt": example.prompt, "expected": expected, "answer": answer})
            if progress:
                progress(len(chunk))
        return {"matches": dict(matches), "counts": dict(counts), "nll": dict(nll), "tokens": dict(tokens),
                "samples": dict(samples)}

    def summarize(self, tallies: list[dict]) -> dict:
        pooled = {key: Counter() for key in ("matches", "counts", "nll", "tokens")}
        samples = defaultdict(list)
        for tally in tallies:
            for key in pooled:
                pooled[key].update(tally[key])
            for task, rows in tally["samples"].items():
                samples[task] += rows[: self.SAMPLES - len(samples[task])]
        result = {}
        for task in [t for t in self.tasks if t in pooled["counts"]]:
            tokens = pooled["tokens"][task]
            result[task] = {"exact_match": pooled["matches"][task] / pooled["counts"][task],
                            "loss": pooled["nll"][task] / tokens if tokens else None,
                            "examples": pooled["counts"][task], "samples": samples[task]}
        scored = list(result.values())
        losses = [m["loss"] for m in scored if m["loss"] is not None]
        result["average"] = {"exact_match": sum(m["exact_match"] for m in scored) / len(scored),
                             "loss": sum(losses) / len(losses) if losses else None,
                             "examples": sum(m["examples"] for m in scored)}
        return result


def make_objective(kind: str, tokenizer, tasks, max_length, **options) -> Objective:
    """The objective of ``kind``; ``options`` go to instruction tuning (``max_new_tokens``, ``layout``)."""
    if kind == "sft":
        return InstructionTuning(tokenizer, tasks, max_length, **options)
    kinds = {"classify": SequenceClassification, "text_to_label": TextToLabel, "lm": LanguageModelling}
    return kinds[kind](tokenizer, tasks, max_length)
