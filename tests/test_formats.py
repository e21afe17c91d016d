"""TRL's preference formats and the one text rule: every format -> the same strings, chat templates, bad rows."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from hhrm import data, formats, formatting
from hhrm.reward import score_file, scoring

# A ChatML-style template that writes BOS itself (as LLaMA-family templates do).
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
U, A, S = "user", "assistant", "system"
ROOT = Path(__file__).resolve().parents[1]


def msg(role: str, content) -> dict:
    return {"role": role, "content": content}


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def plain_tok(tiny):
    """The embedded default's tokenizer (adds no special tokens) with a chat template."""
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def bos_tok(tiny):
    """The same tokenizer made to prepend BOS in ``__call__`` (as LLaMA's does), with the chat template."""
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)]
    )
    tok.chat_template = CHATML
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    return tok


# The same two-turn dialogue in every pair format (contexts padded with spaces: content is stripped).
CONTEXT = [msg(U, "Hi there."), msg(A, " Hello! "), msg(U, "What is 2 plus 2?")]
GOOD, BAD = "2 plus 2 is 4.", "I will not say."
RAW_CONTEXT = "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: What is 2 plus 2?\n\nAssistant:"
HH_PROMPT = "###Human: Hi there. ###Assistant: Hello! ###Human: What is 2 plus 2? ###Assistant:"
FORMS = {
    "raw": {"chosen": f"{RAW_CONTEXT} {GOOD}", "rejected": f"{RAW_CONTEXT} {BAD}"},
    "dahoas": {"prompt": RAW_CONTEXT, "response": " x", "chosen": f" {GOOD}", "rejected": f" {BAD}"},
    "conversational": {"chosen": [*CONTEXT, msg(A, GOOD)], "rejected": [*CONTEXT, msg(A, BAD)]},
    "conversational_explicit": {"prompt": CONTEXT, "chosen": [msg(A, GOOD)], "rejected": [msg(A, BAD)]},
}
# One turn: the standard format's plain-text prompt is a single user message.
ONE_TURN = {
    "raw": {"chosen": f"\n\nHuman: Why?\n\nAssistant: {GOOD}", "rejected": f"\n\nHuman: Why?\n\nAssistant: {BAD}"},
    "dahoas": {"prompt": "\n\nHuman: Why?\n\nAssistant:", "chosen": GOOD, "rejected": BAD},
    "conversational": {"chosen": [msg(U, "Why?"), msg(A, GOOD)], "rejected": [msg(U, "Why?"), msg(A, BAD)]},
    "conversational_explicit": {"prompt": [msg(U, "Why?")], "chosen": [msg(A, GOOD)], "rejected": [msg(A, BAD)]},
    "standard": {"prompt": "Why?", "chosen": f" {GOOD}", "rejected": BAD},
}


def _normalized(row: dict, rule=None) -> dict:
    fmt = formats.detect([row])
    ds, report = data.normalize_rows([row], fmt, "t", rule=rule)
    assert report.dropped == 0, report.summary("t")
    return {k: ds[0][k] for k in data.COLUMNS}


def test_detects_each_format():
    want = {"raw": "raw", "dahoas": "dahoas", "standard": "standard"}
    for name, row in ONE_TURN.items():
        assert formats.detect([row]) == want.get(name, "conversational"), name


def test_same_dialogue_gives_the_same_strings_in_every_format(plain_tok):
    expected = {"prompt": HH_PROMPT, "chosen": f" {GOOD}", "rejected": f" {BAD}"}
    assert {name: _normalized(row) for name, row in FORMS.items()} == dict.fromkeys(FORMS, expected)
    single = {name: _normalized(row) for name, row in ONE_TURN.items()}
    assert single == dict.fromkeys(ONE_TURN, expected | {"prompt": "###Human: Why? ###Assistant:"})
    # The chat-template rule also gives one text per dialogue, whatever the input format.
    rule = formats.TextRule(plain_tok)
    assert len({json.dumps(_normalized(row, rule)) for row in FORMS.values()}) == 1
    assert len({json.dumps(_normalized(row, rule)) for row in ONE_TURN.values()}) == 1


def test_new_formats_load_through_load_splits(tmp_path):
    rows = {
        "conversational": lambda i: {
            "chosen": [msg(U, f"q{i}?"), msg(A, f"yes {i}")],
            "rejected": [msg(U, f"q{i}?"), msg(A, f"no {i}")],
        },
        "conversational_explicit": lambda i: {
            "prompt": [msg(S, "Be brief."), msg(U, f"q{i}?")] if i == 5 else [msg(U, f"q{i}?")],
            "chosen": [msg(A, f"yes {i}")],
            "rejected": [msg(A, f"no {i}")],
        },
        "standard": lambda i: {"prompt": f"q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"},
    }
    for name, make in rows.items():
        folder = tmp_path / name
        folder.mkdir()
        _write_jsonl(folder / "train.jsonl", [make(i) for i in range(6)])
        _write_jsonl(folder / "test.jsonl", [make(100 + i) for i in range(3)])
        args = data.DataArguments(dataset_name=str(folder), test_offset=1, max_bad_row_fraction=0.2)
        splits = data.load_splits(args)
        assert splits.source["format"] == name.removesuffix("_explicit") and splits.source["text_rule"] == "hh"
        assert splits.train.column_names == list(data.COLUMNS) and len(splits.test) == 2
        assert splits.train[1] == {"prompt": "###Human: q1? ###Assistant:", "chosen": " yes 1", "rejected": " no 1"}
        assert splits.train[-1]["prompt"] == "###Human: q100? ###Assistant:" and splits.test[0]["chosen"] == " yes 101"
        # The ### format has no system turn: counted, with what to do.
        system = splits.drops["train"].counts.get("system_message", 0)
        assert (system, len(splits.train)) == ((1, 6) if name == "conversational_explicit" else (0, 7))
        if system:
            assert "use_chat_template=true" in splits.drops["train"].summary("train")


def test_chat_template_text_is_the_template_rendering_with_one_bos(tmp_path, bos_tok, plain_tok):
    conversation = [msg(S, "Be brief."), msg(U, "Hi"), msg(A, "Hello"), msg(U, "2+2?")]
    rows = [
        {"prompt": conversation, "chosen": [msg(A, "4")], "rejected": [msg(A, "5")]},
        FORMS["raw"],  # HH dialogues are rendered by the template as well
    ]
    _write_jsonl(tmp_path / "train.jsonl", rows[:1] * 3)
    _write_jsonl(tmp_path / "test.jsonl", rows[:1])
    args = data.DataArguments(dataset_name=str(tmp_path), test_offset=0, use_chat_template=True)
    splits = data.load_splits(args, bos_tok)
    assert splits.source["text_rule"] == "chat_template" and len(splits.train) == 3
    row = splits.train[0]
    full = bos_tok.apply_chat_template([*conversation, msg(A, "4")], tokenize=False)
    assert full.startswith("<s><|im_start|>system\nBe brief.<|im_end|>")  # the system message is kept
    assert row["prompt"] + row["chosen"] == full.removeprefix("<s>")
    assert row["prompt"].endswith("<|im_start|>assistant\n") and row["chosen"] == "4<|im_end|>\n"
    ids = scoring.encode(bos_tok, [row["prompt"] + row["chosen"]])[0]
    assert ids[0] == bos_tok.bos_token_id and ids.count(bos_tok.bos_token_id) == 1  # no double BOS
    # A tokenizer that adds no BOS keeps the template's: still exactly one BOS.
    for tok in (bos_tok, plain_tok):
        rule = formats.TextRule(tok)
        for r in rows:
            clean = data.normalize_row(r, formats.detect([r]), rule)
            text_ids = scoring.encode(tok, [clean["prompt"] + clean["rejected"]])[0]
            assert text_ids[0] == tok.bos_token_id and text_ids.count(tok.bos_token_id) == 1
    assert formats.TextRule(plain_tok).render(conversation, "4")[0].startswith("<s><|im_start|>system")


def test_chat_template_needs_a_tokenizer_with_one(tmp_path, tiny):
    _write_jsonl(tmp_path / "pairs.jsonl", [FORMS["raw"]])  # one file: both splits
    args = data.DataArguments(dataset_name=str(tmp_path / "pairs.jsonl"), test_offset=0, use_chat_template=True)
    with pytest.raises(ValueError, match=r"^use_chat_template=true .* no tokenizer was given: pass it") as err:
        data.load_splits(args)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^use_chat_template=true, but the tokenizer .* has no chat_template"):
        data.load_splits(args, AutoTokenizer.from_pretrained(tiny["base"]))
    plain = data.DataArguments(dataset_name=str(tmp_path / "pairs.jsonl"), test_offset=0)
    assert data.load_splits(plain).source["text_rule"] == "hh"


def test_bad_messages_counted_by_reason(plain_tok):
    good = FORMS["conversational"]
    hi, ok = [msg(U, "hi")], [msg(A, "ok")]
    bad = {
        "missing_role": {"chosen": [{"content": "hi"}, msg(A, "a")], "rejected": good["rejected"]},
        "missing_content": {"chosen": [msg(U, None), msg(A, "a")], "rejected": good["rejected"]},
        "content_not_string": {"chosen": [msg(U, [{"type": "text"}]), msg(A, "a")], "rejected": good["rejected"]},
        "empty_messages": {"chosen": [], "rejected": good["rejected"]},
        "not_a_list": {"prompt": hi, "chosen": "ok", "rejected": ok},
        "not_a_message": {"chosen": ["hi", msg(A, "a")], "rejected": good["rejected"]},
        "non_alternating": {"chosen": [msg(U, "a"), msg(U, "b"), msg(A, "c")], "rejected": [*hi, msg(A, "d")]},
        "no_assistant_turn": {"chosen": [*hi, msg(A, "a"), msg(U, "b")], "rejected": [*hi, msg(A, "c")]},
        "prompt_mismatch": {"chosen": [msg(U, "a"), msg(A, "b")], "rejected": [msg(U, "z"), msg(A, "c")]},
        "unsupported_role": {"chosen": [*hi, msg("tool", "42"), msg(A, "a")], "rejected": good["rejected"]},
        "system_message": {"prompt": [msg(S, "be nice"), *hi], "chosen": ok, "rejected": [msg(A, "no")]},
        "empty_response": {"prompt": hi, "chosen": [msg(A, "  ")], "rejected": ok},
        "identical_responses": {"prompt": hi, "chosen": ok, "rejected": ok},
    }
    rows = [good, *bad.values(), good]
    ds, report = data.normalize_rows(rows, "conversational", "train")
    assert dict(report.counts) == dict.fromkeys(bad, 1) and ds["row"] == [0, len(rows) - 1]
    assert {k: report.examples[k] for k in bad} == {k: [f"train[{i + 1}]"] for i, k in enumerate(bad)}
    assert report.details["non_alternating"] == "chosen[1] is user, expected assistant"
    # Under the chat template the system message is kept; template errors are bad rows too.
    rule = formats.TextRule(plain_tok)
    ds, report = data.normalize_rows([bad["system_message"]], "conversational", "t", rule=rule)
    assert report.dropped == 0 and "be nice" in ds[0]["prompt"]
    strict = AutoTokenizer.from_pretrained(plain_tok.name_or_path)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}" + CHATML
    )
    ds, report = data.normalize_rows(
        [good, bad["system_message"]], "conversational", "t", rule=formats.TextRule(strict)
    )
    assert dict(report.counts) == {"template_failed": 1} and report.examples["template_failed"] == ["t[1]"]
    assert "no system" in report.details["template_failed"] and "chat_template raised" in report.summary("t")
    shifty = AutoTokenizer.from_pretrained(plain_tok.name_or_path)
    shifty.chat_template = "{{ 'P' if add_generation_prompt else 'F' }}" + CHATML  # prompt is no prefix of the text
    ds, report = data.normalize_rows([good], "conversational", "t", rule=formats.TextRule(shifty))
    assert dict(report.counts) == {"template_prefix_mismatch": 1}


def test_too_many_bad_messages_refuse_the_split(tmp_path):
    rows = [ONE_TURN["conversational"]] * 8 + [{"chosen": [msg(U, "a"), msg(U, "b")], "rejected": []}] * 2
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", rows[:1])
    with pytest.raises(ValueError, match=r"20\.0% of the RM-train split.*no_assistant_turn=2 \(e\.g\. train\[8\]"):
        data.load_splits(data.DataArguments(dataset_name=str(tmp_path), test_offset=0))


def test_detection_refusals_are_one_line_naming_the_setting(tmp_path):
    implicit = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}] * 3
    with pytest.raises(ValueError) as err:
        formats.detect(implicit)
    message = str(err.value)
    assert "\n" not in message and message.startswith("dataset_format:")
    for part in ("add a prompt column", "dataset_format=standard", "dataset_format=conversational"):
        assert part in message, (part, message)
    _write_jsonl(tmp_path / "pairs.jsonl", implicit)
    with pytest.raises(ValueError, match="^dataset_format: .*no prompt column"):
        data.load_splits(data.DataArguments(dataset_name=str(tmp_path / "pairs.jsonl"), test_offset=0))
    for kind, rows in (("pairs", [{"text": "x"}]), ("responses", [{"chosen": "x"}])):
        with pytest.raises(ValueError, match=r"dataset_format=(raw\|)?dahoas\|") as err:
            formats.detect(rows, kind)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="dataset_format='raw'"):
        data.normalize_completions([], "raw", "t")
    for fmt in ("conversational", "standard"):
        assert data.DataArguments(dataset_format=fmt).dataset_format == fmt


def test_format_names_have_one_home():
    """The registry is the one list of format names: settings, help texts and refusals all read it."""
    pairs, responses = ("auto", *formats.names("pairs")), ("auto", *formats.names("responses"))
    assert pairs == formats.choices() == ("auto", *(f.name for f in formats.REGISTRY))
    assert set(responses) < set(pairs) and score_file.KINDS == ("auto", *formats.KINDS)
    for config in (data.DataArguments, score_file.ScoreDataArguments):
        setting = {f.name: f for f in dataclasses.fields(config)}["dataset_format"]
        assert " | ".join(pairs) in setting.metadata["help"], config
        assert tuple(setting.metadata.get("choices", pairs)) == pairs, config
        for name in pairs:
            assert config(dataset_name="x", dataset_format=name).dataset_format == name
        with pytest.raises(ValueError, match=re.escape(f"dataset_format='csv': expected one of {pairs}")):
            config(dataset_name="x", dataset_format="csv")
    with pytest.raises(ValueError, match=re.escape(f"expected one of {responses}")):
        data.normalize_completions([], "raw", "t")
    for kind, names in (("pairs", pairs), ("responses", responses)):
        with pytest.raises(ValueError, match=re.escape(f"dataset_format={'|'.join(names[1:])}")):
            formats.detect([{"text": "x"}], kind)
    # No module writes the list out again (a tuple, a help string, a message).
    copies = re.compile(r"""dahoas["']?\s*[,|]\s*["']?conversational""")
    sources = [*(ROOT / "src").rglob("*.py"), *(ROOT / "scripts").glob("*.py"), *(ROOT / "recipes").glob("*.py")]
    assert not [str(p) for p in sources if copies.search(p.read_text())]


def test_a_row_shows_at_most_one_format():
    """Detection tests are exclusive, so the registry's order does not decide a row's format."""
    values = [None, 3, "plain", "\n\nHuman: hi\n\nAssistant:", [msg(U, "hi")]]
    for prompt, first, second in itertools.product(values, repeat=3):
        for answers in ((first, second), (first,)):
            shown = [f.name for f in formats.REGISTRY if f.shows(prompt, answers)]
            assert len(shown) <= 1, (prompt, answers, shown)


def test_completions_normalise_in_order_with_their_row_index(plain_tok):
    rows = [
        {"prompt": "\n\nHuman: Why?\n\nAssistant:", "response": f" {GOOD}"},  # HH prompt
        {"prompt": "###Human: Why? ###Assistant:", "completion": GOOD},  # TRL's key, ### form
        {"prompt": "Why?", "response": GOOD},  # plain text
        {"prompt": [msg(U, "Why?")], "completion": [msg(A, GOOD)]},  # TRL conversational prompt-completion
        {"prompt": [msg(U, "Why?")], "response": GOOD},  # generated text beside a message-list prompt
    ]
    want = {"prompt": "###Human: Why? ###Assistant:", "response": f" {GOOD}"}
    for row in rows:
        fmt = formats.detect([row], "responses")
        ds, report = data.normalize_completions([row], fmt, "s")
        assert report.dropped == 0 and ds[0] == want | {"row": 0}, (fmt, row)
    assert [formats.detect([r], "responses") for r in rows] == [
        "dahoas",
        "dahoas",
        "standard",
        *["conversational"] * 2,
    ]
    # Order kept, every row accounted for: kept rows carry their input index, the rest are counted.
    mixed = [rows[3], {"prompt": [msg(U, "a")]}, "junk", rows[4], {"prompt": [msg(U, "b")], "response": " "}]
    ds, report = data.normalize_completions(mixed, "auto", "s", first_index=10)
    assert ds["row"] == [10, 13] and ds.column_names == ["prompt", "response", "row"]
    assert dict(report.counts) == {"missing_field": 1, "not_an_object": 1, "empty_response": 1}
    assert len(ds) + report.dropped == len(mixed) and report.examples["empty_response"] == ["s[14]"]
    # The same rule as the pairs: prompt + response is the template's rendering.
    rule = formats.TextRule(plain_tok)
    ds, _ = data.normalize_completions(rows, "conversational", "s", rule=rule)
    pairs, _ = data.normalize_rows([ONE_TURN["conversational"]], "conversational", "p", rule=rule)
    assert len(ds) == 2 and set(ds["prompt"]) == {pairs[0]["prompt"]} and set(ds["response"]) == {pairs[0]["chosen"]}


def test_real_hh_sample_as_conversational_gives_the_raw_strings(hh_sample, tmp_path):
    raw_rows = data.read_rows(str(hh_sample), "test")
    roles = {"Human": U, "Assistant": A}
    converted = []
    for row in raw_rows:
        try:
            turns = {k: formatting.parse_turns(formatting.normalize_newlines(row[k])) for k in ("chosen", "rejected")}
        except ValueError:
            converted.append(row)  # malformed in raw: stays malformed (and is counted) as it is
            continue
        converted.append({k: [msg(roles[r], text) for r, text in v] for k, v in turns.items()})
    _write_jsonl(tmp_path / "conv.jsonl", converted)
    conv_rows = data.read_rows(str(tmp_path / "conv.jsonl"), "test")
    assert formats.detect(conv_rows) == "conversational"
    raw, raw_report = data.normalize_rows(raw_rows, "raw", "test")
    conv, conv_report = data.normalize_rows(conv_rows, "conversational", "test")
    assert len(conv) + conv_report.dropped == len(conv_rows) and len(conv) > 0.95 * len(raw)
    by_row = {r["row"]: r for r in raw}
    assert all(by_row[r["row"]] == r for r in conv)  # every pair kept by both is byte-identical
    # Rows that only the message form refuses are conversations HH writes with two turns of one speaker in a row.
    only_conv = set(conv_report.counts) - set(raw_report.counts)
    assert only_conv <= {"non_alternating", "not_string", "not_a_list"}, conv_report.summary("conv")


# --------------------------------------------------------------------------------------------
# One text, one reward, for chat-template text too (tests/test_rm.py checks the same on ### text)


@pytest.fixture(scope="module")
def chat_rm(tiny, bos_tok, tmp_path_factory):
    """A reward model (random head) whose tokenizer prepends BOS and has the chat template."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("chat_rm")
    model = AutoModelForSequenceClassification.from_pretrained(tiny["base"], num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.config.pad_token_id = bos_tok.pad_token_id
    model.save_pretrained(path)
    bos_tok.save_pretrained(path)
    return path


def test_same_reward_on_all_four_paths_for_chat_template_text(chat_rm, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from hhrm.rm import card as rm_card
    from hhrm.rm import evaluation as rm_eval

    scope: dict = {}
    exec(rm_card.pipeline_snippet(chat_rm, 2), scope)  # the card's snippet, applied to template-rendered texts
    tok = scope["rm_tokenizer"]
    rule = data.text_rule(data.DataArguments(use_chat_template=True), tok)
    system = {"prompt": [msg(S, "Be brief."), msg(U, "Why?")], "chosen": [msg(A, GOOD)], "rejected": [msg(A, BAD)]}
    rows = [FORMS["conversational_explicit"], system]
    pairs, report = data.normalize_rows(rows, "conversational", "t", rule=rule, keep_index=False)
    assert report.dropped == 0 and all(p.startswith("<|im_start|>") for p in pairs["prompt"])  # BOS left to tok
    texts = [p + c for p, c in zip(pairs["prompt"], pairs["chosen"])]
    pipe = [o[0]["score"] for o in scope["rm_pipe"]([t + tok.eos_token for t in texts], **scope["pipe_kwargs"])]
    same = pairs.remove_columns("rejected").add_column("rejected", list(pairs["chosen"]))
    model = AutoModelForSequenceClassification.from_pretrained(chat_rm).eval()
    args = RewardConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=8)
    trainer = RewardTrainer(model=model, args=args, train_dataset=same, eval_dataset=same, processing_class=tok)
    batch = next(iter(trainer.get_eval_dataloader()))
    assert [ids.count(tok.bos_token_id) for ids in batch["input_ids"].tolist()] == [1] * 4  # one BOS per text
    with torch.no_grad():
        train = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    scorer = scoring.RewardScorer.from_pretrained(chat_rm)
    scored = scorer.score_pairs(list(pairs["prompt"]), list(pairs["chosen"]))
    eval_chosen, _ = rm_eval.pair_rewards(scorer, *rm_eval.pair_ids(tok, pairs))
    for other in (train[2:].tolist(), scored, eval_chosen.tolist(), pipe):
        assert other == pytest.approx(train[:2].tolist(), abs=1e-5)
