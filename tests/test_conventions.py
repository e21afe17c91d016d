"""Scoring conventions: each preset, through hhrm's scorer, equals the reference code it names (1e-5, fp32).

Tiny random models of each kind are built offline in seconds: a LLaMA-style decoder RM whose tokenizer adds BOS
(pad distinct from EOS, or pad == EOS, or a chat template) and a DeBERTa-v2 pair RM with a WordPiece tokenizer.
The reference code is written out plainly here, from each tool's own source.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    pipeline,
)

from hhrm.reward import conventions, scoring
from hhrm.reward.conventions import PRESETS

# Prompts in hhrm's ### form and responses of different lengths, so right padding matters.
PROMPTS = [
    "###Human: What is 2 plus 3? ###Assistant:",
    "###Human: Hi there! ###Assistant: Hello! How can I help? ###Human: How many words are in: apple river stone? "
    "###Assistant:",
    "###Human: Which number is larger, 12 or 40? ###Assistant:",
    "###Human: Say something. ###Assistant:",
]
RESPONSES = [" 2 plus 3 is 5.", " There are 3 words.", " The larger number is 40, since 40 is more than 12.", " Ok."]
# The same dialogues as chat messages, written by hand (what verl and TRL's conversational data hold).
MESSAGES = [
    [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}],
    [
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "How many words are in: apple river stone?"},
        {"role": "assistant", "content": "There are 3 words."},
    ],
    [
        {"role": "user", "content": "Which number is larger, 12 or 40?"},
        {"role": "assistant", "content": "The larger number is 40, since 40 is more than 12."},
    ],
    [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": "Ok."}],
]
# Llama-3-like: the template writes BOS itself, so a tokenizer that adds BOS too doubles it (what verl strips).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
)
CORPUS = [p + r for p, r in zip(PROMPTS, RESPONSES)] * 3 + ["<|user|> <|assistant|> question answer text pair"]


def _decoder_tokenizer(pad_is_eos: bool) -> PreTrainedTokenizerFast:
    """Byte-level BPE that prepends BOS (as LLaMA's does); pad distinct from EOS, or pad == EOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<pad>", "<s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>" if pad_is_eos else "<pad>",
        model_input_names=["input_ids", "attention_mask"],
    )


def _llama_rm(tok) -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, num_labels=1, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():  # a visible head, so reading the wrong position shows
        model.score.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def distinct_pad():
    tok = _decoder_tokenizer(pad_is_eos=False)
    return _llama_rm(tok), tok


@pytest.fixture(scope="module")
def pad_is_eos():
    tok = _decoder_tokenizer(pad_is_eos=True)
    tok.chat_template = CHAT_TEMPLATE
    return _llama_rm(tok), tok


def _scorer(model, tok, name: str, **kwargs) -> scoring.RewardScorer:
    return scoring.RewardScorer(model, tok, convention=PRESETS[name], **kwargs)


def _differs(a: list[float], b: list[float]) -> bool:
    return max(abs(x - y) for x, y in zip(a, b)) > 1e-3


# --------------------------------------------------------------------------------------------
# Parity: one test per preset, reference code written plainly


def test_hhrm_and_trl_reward_equal_reward_trainers_own_input_code(distinct_pad):
    from trl.data_utils import _tokenize
    from trl.trainer.reward_trainer import DataCollatorForPreference

    model, tok = distinct_pad
    # TRL RewardTrainer (reward_trainer.py): add_eos on the text, _tokenize, DataCollatorForPreference (right pad),
    # model(**inputs).logits chunked into chosen/rejected.
    texts = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    texts = [t if t.endswith(tok.eos_token) else t + tok.eos_token for t in texts]
    ids = [_tokenize(tok, t)["input_ids"] for t in texts]
    examples = [{"chosen_ids": a, "rejected_ids": b} for a, b in zip(ids, reversed(ids))]
    inputs = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    model.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        chosen, _ = torch.chunk(model(**inputs, use_cache=False).logits.squeeze(-1), chunks=2)
    expected = chosen.tolist()
    assert ids[0][0] == tok.bos_token_id and ids[0][-1] == tok.eos_token_id
    assert conventions.encode(tok, PROMPTS, RESPONSES, PRESETS["hhrm"]) == scoring.encode(tok, texts) == ids
    assert scoring.RewardScorer(model, tok).score_pairs(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)
    for name in ("hhrm", "trl-reward"):
        assert _scorer(model, tok, name, batch_size=2).score_pairs(PROMPTS, RESPONSES) == pytest.approx(
            expected, abs=1e-5
        )


def _card_pipeline(model, tok, texts: list[str]) -> list[float]:
    """The seed card's snippet in its transformers-5 form (library-facts §4)."""
    rm_pipe = pipeline("text-classification", model=model, tokenizer=tok, device="cpu")
    pipe_outputs = rm_pipe(texts, top_k=None, function_to_apply="none", batch_size=1)
    return [output[0]["score"] for output in pipe_outputs]


def _grpo_reference(model, tok, texts: list[str]) -> list[float]:
    """trl/trainer/grpo_trainer.py's reward_funcs lines (non-conversational): right padding, no special tokens."""
    model.config.get_text_config().pad_token_id = tok.pad_token_id
    reward_inputs = tok(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    assert reward_inputs["input_ids"][0, 0] != tok.bos_token_id  # add_special_tokens=False: no BOS
    with torch.inference_mode():
        return model(**reward_inputs).logits[:, 0].tolist()


def test_card_pipeline_equals_the_cards_snippet(pad_is_eos):
    model, tok = pad_is_eos
    texts = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    texts[3] += tok.eos_token  # a text ending in EOS == pad: the pipeline's head skips it, and so must hhrm
    expected = _card_pipeline(model, tok, texts)
    responses = [*RESPONSES[:3], RESPONSES[3] + tok.eos_token]
    got = _scorer(model, tok, "card-pipeline").score_pairs(PROMPTS, responses)
    assert got == pytest.approx(expected, abs=1e-5)
    assert _scorer(model, tok, "card-pipeline").score(texts) == pytest.approx(expected, abs=1e-5)


def test_trl_grpo_equals_grpo_trainers_scoring_lines(pad_is_eos):
    model, tok = pad_is_eos
    expected = _grpo_reference(model, tok, [p + c for p, c in zip(PROMPTS, RESPONSES)])
    got = _scorer(model, tok, "trl-grpo").score_pairs(PROMPTS, RESPONSES)
    assert got == pytest.approx(expected, abs=1e-5)
    assert _differs(got, _scorer(model, tok, "card-pipeline").score_pairs(PROMPTS, RESPONSES))  # BOS matters


def test_openrlhf_equals_serve_rm_and_its_reward_model_forward(pad_is_eos):
    model, tok = pad_is_eos
    # openrlhf/cli/serve_rm.py get_reward + tokenize_fn (left padding, truncation at max_len), then
    # openrlhf/models/model.py RewardModel.forward in eval: position ids from the mask, the value head over every
    # position, gathered at the last attended index. (The texts end in '.', which str.strip(pad) leaves alone.)
    queries = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    queries = [q.strip(tok.pad_token).strip(tok.eos_token) + tok.eos_token for q in queries]
    tok.padding_side = "left"
    try:
        batch = tok(queries, return_tensors="pt", max_length=2048, padding=True, truncation=True)
    finally:
        tok.padding_side = "right"
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    with torch.no_grad():
        hidden = model.model(input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        values = model.score(hidden).squeeze(-1)
    eos_indices = attention_mask.size(1) - 1 - attention_mask.long().fliplr().argmax(dim=1, keepdim=True)
    expected = values.gather(dim=1, index=eos_indices).squeeze(1).tolist()
    got = _scorer(model, tok, "openrlhf").score_pairs(PROMPTS, RESPONSES)
    assert got == pytest.approx(expected, abs=1e-5)
    # pad == EOS: the EOS it appends is read here (true last token), where transformers' head would skip it.
    skipped = scoring.RewardScorer(
        model, tok, convention=conventions.Convention(eos="keep", read_at="last_non_pad")
    ).score_pairs(PROMPTS, [r + tok.eos_token for r in RESPONSES])
    assert _differs(got, skipped)


def test_verl_vllm_equals_chat_template_and_last_token_read(pad_is_eos):
    model, tok = pad_is_eos
    # verl: the RM's chat template over the hand-written messages (policy EOS stripped from the response), a
    # duplicated leading BOS dropped; vLLM /classify (use_activation false): one prompt per request, the raw score
    # at its true last token.
    expected = []
    for chat in MESSAGES:
        ids = tok(tok.apply_chat_template(chat, tokenize=False))["input_ids"]
        assert ids[:2] == [tok.bos_token_id] * 2  # the template's BOS and the tokenizer's
        ids = ids[1:]
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
            expected.append(model.score(hidden[0, -1]).item())
    assert ids[-1] == tok.eos_token_id == tok.pad_token_id  # scored at an EOS equal to the pad
    policy_eos = [r + tok.eos_token for r in RESPONSES]  # the policy's EOS left in its text
    got = _scorer(model, tok, "verl-vllm", batch_size=3).score_pairs(PROMPTS, policy_eos)
    assert got == pytest.approx(expected, abs=1e-5)
    sig = scoring.RewardScorer(
        model, tok, convention=conventions.Convention(**{**vars(PRESETS["verl-vllm"]), "activation": "sigmoid"})
    ).score_pairs(PROMPTS, RESPONSES)
    assert sig == pytest.approx(torch.sigmoid(torch.tensor(expected)).tolist(), abs=1e-6)


def _wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )  # fmt: skip


def _deberta_rm(tok) -> DebertaV2ForSequenceClassification:
    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, type_vocab_size=2, num_labels=1, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return DebertaV2ForSequenceClassification(config).eval()


def test_encoder_pair_equals_the_openassistant_card_snippet():
    tok = _wordpiece_tokenizer()
    model = _deberta_rm(tok)
    questions = [m[-2]["content"] for m in MESSAGES[:1] + MESSAGES[2:]]  # one-turn prompts: the question
    prompts, responses = [PROMPTS[0], *PROMPTS[2:]], [RESPONSES[0], *RESPONSES[2:]]
    # OpenAssistant/reward-model-deberta-v3-large-v2's card: one (question, answer) per forward.
    expected = []
    for question, answer in zip(questions, [r.strip() for r in responses]):
        inputs = tokenizer_out = tok(question, answer, return_tensors="pt")
        with torch.no_grad():
            expected.append(model(**inputs).logits[0].item())
    assert 1 in tokenizer_out["token_type_ids"][0].tolist()  # the pair's second segment is typed
    got = _scorer(model, tok, "encoder-pair").score_pairs(prompts, responses)
    assert got == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------------------------
# Refusals: one line, naming the setting


def _one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_impossible_conventions_are_refused_in_one_line(distinct_pad, pad_is_eos):
    model, tok = pad_is_eos
    for name in ("trl-reward", "hhrm"):
        with pytest.raises(ValueError, match="pad token distinct from EOS") as err:
            conventions.check(PRESETS[name], tok)
        assert f"reward_convention={name!r}" in _one_line(err)
    with pytest.raises(ValueError, match="pad token distinct from EOS"):
        scoring.RewardScorer(model, tok)  # the default keeps hhrm's own check
    dmodel, dtok = distinct_pad
    with pytest.raises(ValueError, match=r"reward_convention='verl-vllm' renders .* chat template") as err:
        scoring.RewardScorer(dmodel, dtok, convention=PRESETS["verl-vllm"])
    _one_line(err)
    with pytest.raises(ValueError, match=r"^rm_convention='nope' is not a reward convention: one of hhrm, ") as err:
        conventions.by_name("nope", setting="rm_convention")
    assert all(name in _one_line(err) for name in PRESETS)
    no_pad = _decoder_tokenizer(pad_is_eos=False)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match=r"reward_convention='trl-grpo' .* no pad token: set tokenizer.pad_token"):
        conventions.check(PRESETS["trl-grpo"], no_pad)
    with pytest.raises(ValueError, match=r"read_at='middle': one of"):
        conventions.Convention(read_at="middle")
    with pytest.raises(ValueError, match="needs the prompt and the response apart: call score_pairs"):
        scoring.RewardScorer(model, tok, convention=PRESETS["verl-vllm"]).score(["a"])
    assert conventions.by_name("verl-vllm") is PRESETS["verl-vllm"]


def test_hash_dialogues_become_messages_and_questions():
    assert conventions.messages(PROMPTS[1], RESPONSES[1]) == MESSAGES[1]
    assert conventions.messages("Plain prompt?", " Answer.") == [
        {"role": "user", "content": "Plain prompt?"},
        {"role": "assistant", "content": "Answer."},
    ]
    assert conventions.question(PROMPTS[0]) == "What is 2 plus 3?"
    assert conventions.question(PROMPTS[1]).startswith("###Human: Hi there! ###Assistant: Hello!")


# --------------------------------------------------------------------------------------------
# A folder says how to score it: config.json's reward_convention, a stated name, or hhrm's rule when pad != EOS


def _save(model, tok, folder, recorded: str | None = None):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if recorded is not None:  # written into the file, as another tool or a hand edit would
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {conventions.CONFIG_KEY: recorded}))
    return folder


@pytest.fixture(scope="module")
def pad_is_eos_folder(pad_is_eos, tmp_path_factory):
    """A pad == EOS Llama RM folder recording no convention (the seed card's RM, or a SmolLM2 one, as shipped)."""
    model, tok = pad_is_eos
    model.config.pad_token_id = tok.pad_token_id
    return _save(model, tok, tmp_path_factory.mktemp("pad_is_eos_rm"))


def test_a_pad_is_eos_folder_recording_nothing_is_refused_until_its_convention_is_stated(
    pad_is_eos, pad_is_eos_folder
):
    with pytest.raises(ValueError, match=r"pad == EOS\) and its config.json records no reward_convention") as err:
        scoring.RewardScorer.from_pretrained(pad_is_eos_folder, device="cpu")
    line = _one_line(err)
    assert repr(str(pad_is_eos_folder)) in line and all(name in line for name in PRESETS)
    assert (
        "set reward_convention to one of" in line
        and "published RM, weqweasdas/" in line
        and "is card-pipeline" in line
    )
    # Stated: loaded from the folder, it scores what the card's pipeline scores on the in-memory model.
    scorer = scoring.RewardScorer.from_pretrained(
        pad_is_eos_folder, device="cpu", dtype=torch.float32, convention="card-pipeline"
    )
    assert scorer.convention is PRESETS["card-pipeline"]
    model, tok = pad_is_eos
    texts = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    assert scorer.score_pairs(PROMPTS, RESPONSES) == pytest.approx(_card_pipeline(model, tok, texts), abs=1e-5)
    # A stated convention that cannot work with pad == EOS is refused by check, before any weight loads.
    with pytest.raises(ValueError, match=r"reward_convention='trl-reward': .* pad token distinct from EOS") as err:
        scoring.RewardScorer.from_pretrained(pad_is_eos_folder, device="cpu", convention="trl-reward")
    _one_line(err)


def test_a_recorded_convention_is_used_without_stating_it(pad_is_eos, pad_is_eos_folder, tmp_path):
    model, tok = pad_is_eos
    folder = _save(model, tok, tmp_path / "grpo_rm", recorded="trl-grpo")
    assert conventions.recorded(folder) == "trl-grpo" and conventions.recorded(pad_is_eos_folder) is None
    scorer = scoring.RewardScorer.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert scorer.convention is PRESETS["trl-grpo"]
    expected = _grpo_reference(model, tok, [p + c for p, c in zip(PROMPTS, RESPONSES)])
    assert scorer.score_pairs(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)
    # A stated name wins over the recorded one.
    stated = scoring.RewardScorer.from_pretrained(
        folder, device="cpu", dtype=torch.float32, convention="card-pipeline"
    )
    assert stated.convention is PRESETS["card-pipeline"]


def test_unknown_convention_names_are_refused_in_one_line(pad_is_eos, pad_is_eos_folder, tmp_path):
    model, tok = pad_is_eos
    with pytest.raises(ValueError, match=r"^rm_convention='nope' is not a reward convention: one of hhrm, ") as err:
        scoring.RewardScorer.from_pretrained(pad_is_eos_folder, convention="nope", convention_setting="rm_convention")
    _one_line(err)
    folder = _save(model, tok, tmp_path / "typo_rm", recorded="card_pipeline")
    with pytest.raises(ValueError, match=r"records reward_convention='card_pipeline', which is not a reward") as err:
        scoring.RewardScorer.from_pretrained(folder, device="cpu")
    line = _one_line(err)
    assert repr(str(folder)) in line and "card-pipeline" in line and "set reward_convention to override it" in line
    assert conventions.resolve(folder, "card-pipeline", tok) is PRESETS["card-pipeline"]  # stating it overrides


def test_a_folder_with_a_distinct_pad_and_nothing_recorded_is_hhrms(distinct_pad, tmp_path):
    model, tok = distinct_pad
    folder = _save(model, tok, tmp_path / "old_hhrm_rm")
    assert conventions.recorded(folder) is None and conventions.recorded(tmp_path / "nowhere") is None
    assert conventions.resolve(folder, None, tok) is PRESETS["hhrm"]
    scorer = scoring.RewardScorer.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert scorer.convention is PRESETS["hhrm"]
    expected = scoring.RewardScorer(model, tok).score_pairs(PROMPTS, RESPONSES)
    assert scorer.score_pairs(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------------------------
# The real SmolLM2 tokenizer: pad == EOS and a chat template


@pytest.mark.slow
def test_real_tokenizer_card_pipeline_and_verl_vllm(real_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_model["out"])
    tok.pad_token = tok.eos_token  # the checkpoint's own choice (library-facts §9): pad == EOS == <|im_end|>
    assert tok.chat_template and tok.pad_token_id == tok.eos_token_id
    model = _llama_rm(tok)  # a tiny random model over the real vocabulary
    texts = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    pipe_outputs = pipeline("text-classification", model=model, tokenizer=tok, device="cpu")(
        texts, top_k=None, function_to_apply="none", batch_size=1
    )
    expected = [output[0]["score"] for output in pipe_outputs]
    assert _scorer(model, tok, "card-pipeline").score_pairs(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)
    expected = []
    for chat in MESSAGES:
        ids = tok(tok.apply_chat_template(chat, tokenize=False))["input_ids"]
        if tok.bos_token_id is not None and ids[:2] == [tok.bos_token_id] * 2:
            ids = ids[1:]
        with torch.no_grad():
            expected.append(model.score(model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]).item())
    got = _scorer(model, tok, "verl-vllm").score_pairs(PROMPTS, [r + tok.eos_token for r in RESPONSES])
    assert got == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------------------------
# The disagreement matrix command


def test_conventions_matrix_command(pad_is_eos, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    model, tok = pad_is_eos
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rows = [{"prompt": p, "chosen": r, "rejected": " No."} for p, r in zip(PROMPTS, RESPONSES)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = Path(__file__).resolve().parents[1] / "scripts" / "conventions_matrix.py"
    cmd = [sys.executable, str(script), "--model", str(tmp_path / "rm"), "--data", str(tmp_path / "pairs.jsonl")]
    out = subprocess.run([*cmd, "--out", str(tmp_path / "m.md")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = (tmp_path / "m.md").read_text()
    assert text == out.stdout and "4 pairs" in text
    # pad == EOS: the presets that append EOS and read the head's position are refused, naming why.
    assert "| hhrm | - | - | not applied: reward_convention='hhrm': the reward tokenizer needs a pad token" in text
    assert "| encoder-pair | - | - | not applied: a text pair is for encoder RMs |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.count(" | ") == 4]
    applied = [line.split(" | ")[0][2:] for line in rows if "not applied" not in line]
    assert {"card-pipeline", "trl-grpo", "openrlhf", "verl-vllm"} <= set(applied)
    # The card's way, through the command, equals the scorer on the same pairs.
    card = _scorer(model, tok, "card-pipeline").score_pairs(PROMPTS + PROMPTS, RESPONSES + [" No."] * 4)
    mean = sum(card) / len(card)
    assert f"| card-pipeline | {sum(a > b for a, b in zip(card[:4], card[4:])) / 4:.3f} | {mean:.4f} |" in text
    assert "Spearman rank correlation" in text
