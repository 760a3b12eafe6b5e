"""Instruction tuning: prompt masking, left truncation, chat templates, generation, instruction files, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

import rankshare as rs
from conftest import LLAMA3, bigram_llama, randomise_adapters, word_tokenizer
from rankshare.cli import main
from rankshare.errors import RankshareError
from rankshare.finetune.data import DataSplits, Instruction, load_data
from rankshare.finetune.objectives import IGNORE, InstructionTuning, end_token_ids, normalised

# A template in the usual form: each turn between role markers, the answer's turn closed by the eos token.
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_plain_layout_is_prompt_newline_response_eos(tokenizer):
    objective = InstructionTuning(tokenizer, {"t": []}, max_length=64)
    assert not objective.chat
    example = Instruction.of("what is two plus two", "four", "t")
    assert objective.render(example) == ("what is two plus two\n", "four[SEP]")
    prompt, response, cut = objective.encode_pair(example)
    assert (prompt, response, cut) == (ids(tokenizer, "what is two plus two\n"), ids(tokenizer, "four [SEP]"), False)


def test_the_chat_template_renders_the_conversation_and_the_answer_is_what_follows_the_prompt(chat_tokenizer):
    objective = InstructionTuning(chat_tokenizer, {"t": []}, max_length=64)
    assert objective.chat
    example = Instruction((("system", "be brief"), ("user", "two plus two"), ("assistant", "four")), "t")
    prompt, response = objective.render(example)
    assert prompt == "<system> be brief [SEP] <user> two plus two [SEP] <assistant> "
    assert response == "four [SEP] "  # the rest of the rendered conversation, the end of the turn included
    assert prompt + response == chat_tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in example.turns], tokenize=False)
    # Generation starts from exactly the prompt that training saw.
    assert objective.prompt_ids(example.context) == objective.encode_pair(example)[0]
    with pytest.raises(RankshareError, match="no chat template"):
        InstructionTuning(AutoTokenizer.from_pretrained(chat_tokenizer.name_or_path), {}, 64, layout="chat")
    assert not InstructionTuning(chat_tokenizer, {}, 64, layout="plain").chat


def test_prompt_tokens_carry_no_loss(tiny_llama, tokenizer):
    """loss = mean over response tokens of −log p(token | everything before it); prompt positions are −100."""
    objective = InstructionTuning(tokenizer, {"t": []}, max_length=64)
    examples = [Instruction.of("what is two plus two", "four", "t"), Instruction.of("name a colour please", "red", "t")]
    batch = objective.batch(examples, "cpu")
    labels = batch.inputs["labels"]
    for row, example in enumerate(examples):
        prompt, response, _ = objective.encode_pair(example)
        assert labels[row, : len(prompt)].eq(IGNORE).all()
        assert labels[row, len(prompt) : len(prompt) + len(response)].tolist() == response
        assert labels[row, len(prompt) + len(response) :].eq(IGNORE).all()  # padding
    model = LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        loss = objective.loss(model, batch)
        logits = model(input_ids=batch.inputs["input_ids"], attention_mask=batch.inputs["attention_mask"]).logits
    terms = []
    for row, example in enumerate(examples):
        prompt, response, _ = objective.encode_pair(example)
        for k, token in enumerate(response):
            position = len(prompt) + k  # predicted from the logits one position earlier
            terms.append(-F.log_softmax(logits[row, position - 1], -1)[token])
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_long_prompts_lose_their_left_and_too_long_responses_are_left_out(tokenizer):
    objective = InstructionTuning(tokenizer, {"t": []}, max_length=12)
    long_prompt = " ".join(f"word{i}" for i in range(40)) + " so what is it"
    prompt, response, cut = objective.encode_pair(Instruction.of(long_prompt, "four", "t"))
    assert cut and len(prompt) + len(response) == 12
    assert response == ids(tokenizer, "four [SEP]")  # the answer survives whole
    assert prompt == ids(tokenizer, long_prompt + "\n")[-len(prompt):]  # the prompt's end survives
    too_long = Instruction.of("hi", " ".join(["four"] * 12), "t")
    assert objective.encode_pair(too_long) is None
    fits = Instruction.of("short question", "yes", "t")
    splits = DataSplits({"t": []}, [fits, too_long, Instruction.of(long_prompt, "four", "t")], [fits], [too_long])
    kept, counts = objective.fit_splits(splits)
    assert kept.train == [fits, Instruction.of(long_prompt, "four", "t")] and kept.test == []
    assert counts == {"train": {"cut": 1, "skipped": 1}, "validation": {"cut": 0, "skipped": 0},
                      "test": {"cut": 0, "skipped": 1}}


def test_batched_greedy_generation_with_left_padding_equals_one_prompt_at_a_time(tiny_llama, tokenizer):
    torch.manual_seed(0)
    model = rs.adapt(LlamaForCausalLM.from_pretrained(tiny_llama), rs.MorConfig(rank=4, num_experts=3,
                     target_modules=["q_proj", "v_proj"])).eval()
    randomise_adapters(model)  # so that routing and the update matter
    objective = InstructionTuning(tokenizer, {"t": []}, max_length=64, max_new_tokens=6)
    contexts = [(("user", "what is two plus two"),), (("user", "hi"),), (("user", "name three colours of a flag"),)]
    with torch.no_grad():
        together = objective.generate(model, contexts, "cpu")
        alone = [objective.generate(model, [context], "cpu")[0] for context in contexts]
    assert together == alone
    assert all(answer.strip() for answer in together)


def test_exact_match_ignores_case_and_spacing():
    assert normalised("  The  Answer\n") == normalised("the answer")
    assert normalised("4 2") != normalised("42")


# --- the end of an answer ----------------------------------------------------------------------------------


def with_eos(eos_token_id) -> SimpleNamespace:
    """A model as ``end_token_ids`` reads it (its generation config), whose own end tokens are ``eos_token_id``."""
    return SimpleNamespace(generation_config=GenerationConfig(eos_token_id=eos_token_id))


def test_the_end_tokens_are_the_models_then_the_tokenizers_then_the_templates_end_of_turn(tokenizer, chat_tokenizer):
    chatml = word_tokenizer()
    eos, im_end, stop = (chatml.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "stop"))
    assert end_token_ids(chatml, with_eos(None)) == [eos, im_end]
    assert end_token_ids(chatml, with_eos(eos)) == [eos, im_end]
    assert end_token_ids(chatml, with_eos([im_end, stop])) == [im_end, stop, eos]
    # Llama-3 closes a turn with <|eot_id|>, after a header of special tokens: the first one after the answer.
    assert end_token_ids(word_tokenizer(LLAMA3), with_eos(None)) == [eos, chatml.convert_tokens_to_ids("<|eot_id|>")]
    assert end_token_ids(word_tokenizer(chat_template=None), with_eos(None)) == [eos]
    sep = tokenizer.convert_tokens_to_ids("[SEP]")  # the tiny LLaMA's eos, which closes its template's turns too
    assert end_token_ids(chat_tokenizer, with_eos(None)) == end_token_ids(tokenizer, with_eos(sep)) == [sep]


@pytest.fixture
def generated_lengths(monkeypatch) -> list[int]:
    """How many tokens each call of a LLaMA's ``generate`` adds to its prompts."""
    lengths, original = [], LlamaForCausalLM.generate

    def recording(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        lengths.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    monkeypatch.setattr(LlamaForCausalLM, "generate", recording)
    return lengths


def test_evaluation_stops_at_the_templates_end_of_turn_and_scores_the_answer(generated_lengths):
    chatml = word_tokenizer()  # its eos is <|endoftext|>; the template closes a turn with <|im_end|>
    model = bigram_llama(chatml, {"assistant": "four", "four": "<|im_end|>"}, otherwise="more")
    objective = InstructionTuning(chatml, {"t": []}, max_length=32, max_new_tokens=6)
    assert objective.chat
    tally = objective.tally(model, [Instruction.of("what is two plus two", "four", "t")], 4, "cpu")
    result = objective.summarize([tally])["t"]
    assert result["samples"][0]["answer"] == "four" and result["exact_match"] == 1.0
    assert generated_lengths == [2]  # four, <|im_end|>; not max_new_tokens


def test_an_answer_ends_at_its_first_end_token_though_the_tokenizer_would_print_it(generated_lengths):
    chatml = word_tokenizer()
    # The model's own end token is a word that decoding keeps, unlike the special tokens it skips.
    model = bigram_llama(chatml, {"two": "four", "four": "stop", "plus": "more"}, otherwise="more")
    model.generation_config.eos_token_id = [chatml.convert_tokens_to_ids("stop")]
    objective = InstructionTuning(chatml, {"t": []}, max_length=32, max_new_tokens=4, layout="plain")
    contexts = [(("user", "what is two plus two"),), (("user", "what is two plus"),)]
    assert objective.generate(model, contexts, "cpu") == ["four", "more more more more"]
    assert generated_lengths == [4]


# --- instruction files --------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def addition_rows(n: int = 60) -> list[dict]:
    return [{"prompt": f"what is {a} plus {a + 1}", "response": str(2 * a + 1), "task": "add" if a % 2 else "sum"}
            for a in range(n)]


def test_an_instruction_file_splits_each_task_apart_and_never_shares_a_prompt(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", addition_rows() + addition_rows()[:5])  # 5 duplicates
    splits = load_data(str(path), task_column="task")
    assert splits.instructions and set(splits.tasks) == {"add", "sum"} and splits.tasks["add"] == []
    prompts = [{e.prompt for e in split} for split in (splits.train, splits.validation, splits.test)]
    assert sum(map(len, prompts)) == 60 and not (prompts[0] & prompts[1] or prompts[0] & prompts[2]
                                                 or prompts[1] & prompts[2])
    assert load_data(str(path), task_column="task").test == splits.test  # the seed decides the split
    messages = [{"messages": [{"role": "user", "content": r["prompt"]},
                              {"role": "assistant", "content": r["response"]}]} for r in addition_rows()]
    from_messages = load_data(str(write_jsonl(tmp_path / "chat.jsonl", messages)))
    assert from_messages.tasks == {"chat": []} and from_messages.train[0].turns[-1][0] == "assistant"


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "what is one plus one"}, "line 3 of .* has no 'response'"),
    ({"prompt": "what is one plus one", "response": "  "}, "line 3 of .* has no 'response' \\(or it is empty\\)"),
    ({"response": "2", "prompt": ""}, "line 3 of .* has no 'prompt'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "line 3 of .*no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "line 3 of .*last assistant turn is empty"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "line 3 of .*needs a role"),
])
def test_a_bad_instruction_row_is_named_by_its_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [*addition_rows(2), row, *addition_rows(10)])
    with pytest.raises(RankshareError, match=message):
        load_data(str(path))


# --- the command line ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tiny_llama, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sft")
    data = write_jsonl(folder / "rows.jsonl", addition_rows())
    out = folder / "run"
    assert main(["train", "--model", str(tiny_llama), "--data", str(data), "--task-column", "task", "--method", "mor",
                 "--num-experts", "2", "--rank", "4", "--max-steps", "4", "--batch-size", "8", "--max-new-tokens", "4",
                 "--quiet", "--out", str(out)]) == 0
    return out


def test_an_sft_run_reports_exact_match_loss_and_samples(sft_run):
    metrics = json.loads((sft_run / "metrics.json").read_text())
    assert metrics["config"]["objective"] == "sft" and metrics["config"]["max_length"] == 128
    test = metrics["metrics"]["test"]
    assert set(test) == {"add", "sum", "average"}
    for task in ("add", "sum"):
        assert 0 <= test[task]["exact_match"] <= 1 and test[task]["loss"] > 0 and test[task]["examples"] == 3
        assert len(test[task]["samples"]) == 3 and {"prompt", "expected", "answer"} <= set(test[task]["samples"][0])
    assert metrics["fitting"]["train"] == {"cut": 0, "skipped": 0}
    report = (sft_run / "report.md").read_text()
    assert "## Sample generations" in report and "exact match" in report
    assert set(metrics["router"]) == {"add", "sum"}  # routing over the examples' own tokens


def test_generate_answers_a_prompt_and_a_file(sft_run, tmp_path, capsys):
    assert main(["generate", "--adapter", str(sft_run), "--prompt", "what is 3 plus 4", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", "--adapter", str(sft_run), "--task", "add", "--prompt", "what is 3 plus 4"]) == 0
    rows = write_jsonl(tmp_path / "ask.jsonl", [{"prompt": "what is 1 plus 2"}, {"messages": [
        {"role": "user", "content": "what is 5 plus 6"}, {"role": "assistant", "content": "11"}]}])
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--adapter", str(sft_run), "--data", str(rows), "--out", str(out), "--quiet",
                 "--max-new-tokens", "3"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["prompt"] for a in answers] == ["what is 1 plus 2", "what is 5 plus 6"]


def test_generate_and_train_refuse_bad_input_in_one_line(sft_run, tiny_llama, tmp_path, capsys):
    assert main(["generate", "--adapter", str(sft_run), "--task", "nope", "--prompt", "hi"]) == 2
    assert "--task nope names no task" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [*addition_rows(5), {"prompt": "what is 1 plus 1", "response": ""}])
    out = tmp_path / "never"
    assert main(["train", "--model", str(tiny_llama), "--data", str(bad), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "line 6 of" in err and "bad.jsonl" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    good = write_jsonl(tmp_path / "good.jsonl", addition_rows())
    assert main(["train", "--model", str(tiny_llama), "--data", str(good), "--objective", "classify"]) == 2
    assert "instruction data" in capsys.readouterr().err


def test_a_bfloat16_base_with_gradient_checkpointing_trains_from_the_command_line(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", addition_rows())
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama), "--data", str(data), "--method", "lotr", "--rank", "4",
                 "--max-steps", "3", "--batch-size", "8", "--dtype", "bfloat16", "--gradient-checkpointing",
                 "--max-new-tokens", "2", "--quiet", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["dtype"] == "bfloat16" and metrics["config"]["gradient_checkpointing"]
    assert torch.isfinite(torch.tensor(metrics["metrics"]["test"]["average"]["loss"]))


def test_a_merged_sft_run_answers_as_the_run_with_that_tasks_gates(sft_run, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(sft_run), "--gates", "add", "--out", str(merged)]) == 0
    capsys.readouterr()
    answers = []
    for adapter in (["--adapter", str(sft_run), "--task", "add"], ["--adapter", str(merged)]):
        assert main(["generate", *adapter, "--prompt", "what is 3 plus 4", "--max-new-tokens", "5"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()
    assert main(["generate", "--adapter", str(merged), "--task", "add", "--prompt", "hi"]) == 2
    assert "merged model folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def layout_runs(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Two runs on one base whose tokenizer has a chat template: ``plain`` laid out without it (up to 128 tokens),
    ``chat`` with it, cut to 10 tokens."""
    folder = tmp_path_factory.mktemp("layouts")
    base = folder / "base"
    LlamaForCausalLM.from_pretrained(tiny_llama).save_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(base)
    data = write_jsonl(folder / "rows.jsonl", addition_rows())
    runs = {}
    for layout, length in (("plain", "128"), ("chat", "10")):
        runs[layout] = folder / layout
        assert main(["train", "--model", str(base), "--data", str(data), "--method", "lotr", "--rank", "4",
                     "--max-steps", "2", "--batch-size", "8", "--max-new-tokens", "2", "--prompt-layout", layout,
                     "--max-length", length, "--quiet", "--out", str(runs[layout])]) == 0
    return runs


@pytest.fixture
def prompts_seen(monkeypatch) -> list[list[int]]:
    """The prompt of every row an adapted model generates from, without its padding."""
    seen, original = [], rs.AdaptedModel.generate

    def recording(self, *args, **kwargs):
        for row, mask in zip(kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist()):
            seen.append([token for token, kept in zip(row, mask) if kept])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rs.AdaptedModel, "generate", recording)
    return seen


def test_generate_with_several_runs_lays_out_and_cuts_each_prompt_as_its_own_run(layout_runs, chat_tokenizer,
                                                                                  prompts_seen, tmp_path, capsys):
    question = "what is 3 plus 4 if you add them together"
    plain = ids(chat_tokenizer, question + "\n")
    chat = ids(chat_tokenizer, f"<user> {question} [SEP] <assistant> ")[-9:]  # max_length 10 leaves 9 to a prompt
    assert len(plain) > 9  # so that the chat run's length would cut the plain prompt too
    adapters = [arg for name, run in layout_runs.items() for arg in ("--adapter", f"{name}={run}")]
    rows = write_jsonl(tmp_path / "ask.jsonl", [{"prompt": question, "task": "chat"},
                                                {"prompt": question, "task": "plain"}])
    out = tmp_path / "answers.jsonl"
    assert main(["generate", *adapters, "--data", str(rows), "--out", str(out), "--task-column", "task",
                 "--max-new-tokens", "3", "--quiet"]) == 0
    assert prompts_seen == [chat, plain]
    mixed = {row["task"]: row["answer"] for row in map(json.loads, out.read_text().splitlines())}
    # Each answer is its run's alone, and --task chooses the layout with the adapter.
    prompts_seen.clear()
    capsys.readouterr()
    asked = ["--prompt", question, "--max-new-tokens", "3"]
    for name in ("chat", "plain"):
        assert main(["generate", "--adapter", str(layout_runs[name]), *asked]) == 0
        alone = capsys.readouterr().out
        assert main(["generate", *adapters, "--task", name, *asked]) == 0
        assert capsys.readouterr().out == alone and alone.strip() == mixed[name].strip()
    assert prompts_seen == [chat, chat, plain, plain]


def test_predict_answers_each_row_with_its_tasks_sft_adapter(sft_run, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": "what is 1 plus 2", "task": "add"},
                                                 {"text": "what is 2 plus 3", "task": "sum"}])
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", "--adapter", f"add={sft_run}", "--adapter", f"sum={sft_run}", "--data", str(rows),
                 "--out", str(out), "--max-new-tokens", "3", "--quiet"]) == 0
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["task"] for p in predicted] == ["add", "sum"] and all(isinstance(p["prediction"], str) for p in predicted)
    # The run routes every token itself, as generate does without --task.
    assert main(["generate", "--adapter", str(sft_run), "--prompt", "what is 1 plus 2", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() == predicted[0]["prediction"]
