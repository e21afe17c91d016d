"""Reward-model scoring conventions as data: how a (prompt, response) becomes token ids, and where the score is read.

Every tool scores a reward model by its own hard-coded rule, and the rules disagree (TRL's RewardTrainer appends
EOS, TRL's GRPO does not; transformers' head reads the rightmost non-pad token, vLLM the true last token; verl
renders the RM's chat template; encoder RMs take a text pair). A :class:`Convention` is one record of those choices,
and :data:`PRESETS` name the ones that reproduce a known tool's code (each is proven equal to that code in
``tests/test_conventions.py``). This module is plain data plus tokenization: it imports no model code and no hhrm
stage, so data preparation can use it; :class:`hhrm.reward.scoring.RewardScorer` applies the model side (``read_at``,
``activation``).

A reward model folder says how to score it: hhrm's RM export records its preset under :data:`CONFIG_KEY` in
config.json, and :func:`resolve` reads it (a stated name first, hhrm's own rule for older folders whose pad is not
their EOS; a pad == EOS folder recording nothing is refused, as it could have been trained under either rule).

``python scripts/conventions_matrix.py --model FOLDER --data FILE`` prints how far the presets disagree on one RM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hhrm import formatting

TEXTS = ("concat", "chat_template", "pair")
EOS_RULES = ("append", "strip", "keep")
READ_AT = ("last_non_pad", "last_token")
ACTIVATIONS = ("none", "sigmoid")
SIDES = ("right", "left", None)


@dataclass(frozen=True)
class Convention:
    """One way to turn ``(prompt, response)`` into a reward-model input and read its score."""

    # The preset (the code it reproduces) or "custom": the identity shown in reports and refusals.
    name: str = "custom"
    # "concat": prompt + response as one string (hhrm's ``###`` rule); "chat_template": the RM tokenizer's chat
    # template over messages converted from the ``###`` dialogue; "pair": (question, answer) as a tokenizer text pair
    # (encoder RMs).
    text: str = "concat"
    # "append": add the EOS string when the text (the response, for chat_template/pair) does not end with it;
    # "strip": remove trailing EOS strings (a policy's EOS left in the response); "keep": the text as given.
    eos: str = "append"
    # Drop a duplicated leading BOS (a chat template that writes BOS, tokenized by a tokenizer that adds one): verl.
    dedup_bos: bool = False
    # Passed to the tokenizer's ``__call__``: whether it adds its own special tokens (LLaMA's BOS, BERT's CLS/SEP).
    add_special_tokens: bool = True
    # "last_non_pad": the model's own head (transformers' decoder heads read the rightmost token that is not the pad
    # id, so with pad == EOS a final EOS is skipped; encoders read their CLS); "last_token": the true last token of
    # each text whatever its id, as vLLM and OpenRLHF read.
    read_at: str = "last_non_pad"
    # "none": the raw logit; "sigmoid": squashed to (0, 1), as vLLM's /classify does unless told not to.
    activation: str = "none"
    # Which end the tokenizer cuts when a text is longer than max_length (None: the tokenizer's own truncation_side).
    truncation_side: str | None = None
    # Longest input in tokens; None: no truncation (a too-long text is the model's to refuse).
    max_length: int | None = None

    def __post_init__(self):
        for field, allowed in (
            ("text", TEXTS),
            ("eos", EOS_RULES),
            ("read_at", READ_AT),
            ("activation", ACTIVATIONS),
            ("truncation_side", SIDES),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"reward convention {field}={getattr(self, field)!r}: one of {allowed}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"reward convention max_length={self.max_length}: must be >= 1 or None")


PRESETS: dict[str, Convention] = {
    c.name: c
    for c in (
        # hhrm's rule, which is RewardTrainer's: text + EOS, the tokenizer's own special tokens, the head's reading.
        Convention("hhrm"),
        # The seed card's snippet: pipeline("text-classification", function_to_apply="none", batch_size=1) on the raw
        # ###Human/###Assistant text, no EOS appended; one unpadded text per forward = the head's reading.
        Convention("card-pipeline", eos="keep"),
        # TRL RewardTrainer's training input (reward_trainer.py add_eos + _tokenize + right padding); it filters,
        # not truncates, texts over max_length.
        Convention("trl-reward"),
        # TRL GRPO's reward_funcs scoring (grpo_trainer.py): prompt + completion, no EOS, add_special_tokens=False,
        # right padding, logits[:, 0] (the head's reading; pad := eos when the tokenizer has none).
        Convention("trl-grpo", eos="keep", add_special_tokens=False),
        # OpenRLHF's serve_rm: strips pad/EOS from the query, re-appends one EOS, tokenizes with special tokens,
        # truncation at --max_len 2048, reads the last attended token (attention-mask gather). Its str.strip(pad)
        # removes any of those *characters* at both ends (a final "d" of a text, with pad "<pad>"); hhrm does not.
        Convention("openrlhf", read_at="last_token", truncation_side="right", max_length=2048),
        # verl with a vLLM-served RM: the RM's chat template, the policy's EOS stripped, a duplicated BOS stripped,
        # the true last token, the raw logit (use_activation: false).
        Convention("verl-vllm", text="chat_template", eos="strip", dedup_bos=True, read_at="last_token"),
        # An encoder RM (OpenAssistant's DeBERTa): tokenizer(question, answer), the model's CLS head, raw logit.
        Convention("encoder-pair", text="pair", eos="keep"),
    )
}
HHRM = PRESETS["hhrm"]
# The key of a reward model folder's config.json that names the preset it is scored by.
CONFIG_KEY = "reward_convention"


def by_name(name: str, setting: str = "reward_convention") -> Convention:
    """The preset called ``name``; refused in one line listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"{setting}={name!r} is not a reward convention: one of {', '.join(PRESETS)}")
    return PRESETS[name]


def recorded(path) -> str | None:
    """The preset name a reward model folder's config.json records under :data:`CONFIG_KEY` (nothing is loaded);
    ``None`` when it records none, or ``path`` is not a local folder with a readable config.json (a hub id)."""
    config = Path(path).expanduser() / "config.json"
    try:
        value = json.loads(config.read_text()).get(CONFIG_KEY)
    except (OSError, ValueError, AttributeError):  # no folder, no or unreadable config: the folder check refuses it
        return None
    return None if value is None else str(value)


def resolve(path, name: str | None, tokenizer, setting: str = "reward_convention") -> Convention:
    """The convention a reward model folder is scored by, checked against its tokenizer (:func:`check`).

    ``name`` (the user's ``setting``) when given; else the preset the folder records (:func:`recorded`); else hhrm's
    rule when the pad token is not the EOS (hhrm's exports before they recorded one). A pad == EOS folder that
    records nothing is refused: it may score text + EOS at the EOS (read past the pad) or the text as given (the
    seed card's RM), and the two disagree.
    """
    if name is not None:
        convention = by_name(name, setting)
    elif (name := recorded(path)) is not None:
        if name not in PRESETS:
            raise ValueError(
                f"{str(path)!r}: its config.json records {CONFIG_KEY}={name!r}, which is not a reward convention: "
                f"one of {', '.join(PRESETS)}; fix config.json, or set {setting} to override it"
            )
        convention = PRESETS[name]
    elif tokenizer.pad_token_id is None or tokenizer.pad_token_id != tokenizer.eos_token_id:
        convention = HHRM  # no pad at all: check() says so
    else:
        raise ValueError(
            f"reward model {str(path)!r}: its tokenizer's pad token is its EOS ({tokenizer.eos_token!r}, pad == EOS) "
            f"and its config.json records no {CONFIG_KEY}, so how it is scored is unknown: set {setting} to one of "
            f"{', '.join(PRESETS)} (the seed card's published RM, weqweasdas/hh_rlhf_rm_open_llama_3b, is "
            "card-pipeline: the text as given, no EOS appended)"
        )
    check(convention, tokenizer, setting)
    return convention


def check(convention: Convention, tokenizer, setting: str = "reward_convention") -> None:
    """Refuse, in one line naming ``setting``, a convention that cannot work with this tokenizer."""
    where = f"{setting}={convention.name!r}"
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if convention.eos in ("append", "strip") and tokenizer.eos_token is None:
        raise ValueError(f"{where} {convention.eos}s the EOS, but the reward tokenizer has no eos_token; set one")
    if convention.read_at == "last_non_pad" and convention.text != "pair":
        if pad is None:
            raise ValueError(
                f"{where} reads the score at the last non-pad token, but the reward tokenizer has no pad token: "
                "set tokenizer.pad_token (TRL GRPO uses the EOS)"
            )
        if convention.eos == "append" and pad == eos:
            raise ValueError(
                f"{where}: the reward tokenizer needs a pad token distinct from EOS (pad={tokenizer.pad_token!r}): "
                "the score is read at the last non-pad token, so pad == eos would skip the EOS the model was trained "
                "to score; re-export it with a distinct pad token, or use a convention with read_at='last_token'"
            )
    if convention.text == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{where} renders the reward tokenizer's chat template, but {getattr(tokenizer, 'name_or_path', '')!r} "
            "has none: pick a convention with text='concat', or set tokenizer.chat_template"
        )
    if convention.text == "pair" and pad is None:
        raise ValueError(f"{where} pads text pairs, but the reward tokenizer has no pad token; set one")


# --------------------------------------------------------------------------------------------
# Text: the policy's (prompt, response) -> the RM's input


def messages(prompt: str, response: str) -> list[dict[str, str]]:
    """Chat messages of a ``###`` dialogue prompt and its response (a prompt without turn markers is one user turn)."""
    prompt = formatting.normalize_newlines(prompt)
    if formatting.has_turn_markers(prompt):
        turns = formatting.parse_turns(prompt)
        if turns and turns[-1] == ("Assistant", ""):  # the prompt's trailing "###Assistant:" awaits the response
            turns = turns[:-1]
    else:
        turns = [("Human", prompt.strip())]
    role = {"Human": "user", "Assistant": "assistant"}
    return [*({"role": role[r], "content": t} for r, t in turns), {"role": "assistant", "content": response.strip()}]


def question(prompt: str) -> str:
    """The question side of a text pair: a one-turn ``###`` prompt's Human text, else the prompt without its trailing
    ``###Assistant:`` marker (earlier turns kept as context)."""
    prompt = formatting.normalize_newlines(prompt)
    if not formatting.has_turn_markers(prompt):
        return prompt.strip()
    turns = [t for t in formatting.parse_turns(prompt) if t != ("Assistant", "")]
    if len(turns) == 1 and turns[0][0] == "Human":
        return turns[0][1]
    return formatting.render_turns(turns)


def _eos_rule(text: str, eos_token: str | None, rule: str) -> str:
    if rule == "append":
        return text if text.endswith(eos_token) else text + eos_token
    if rule == "strip" and eos_token:
        while text.endswith(eos_token):
            text = text[: -len(eos_token)]
    return text


def texts(tokenizer, prompts: list[str], responses: list[str], convention: Convention) -> list:
    """The strings the tokenizer sees: one per text, or ``(question, answer)`` pairs for ``text="pair"``."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    eos = tokenizer.eos_token
    if convention.text == "concat":
        return [_eos_rule(p + r, eos, convention.eos) for p, r in zip(prompts, responses)]
    if convention.text == "pair":
        return [(question(p), _eos_rule(r.strip(), eos, convention.eos)) for p, r in zip(prompts, responses)]
    out = []
    for p, r in zip(prompts, responses):
        # EOS rule on the response content: "strip" removes a policy's EOS before the template adds its own ending.
        chat = messages(p, _eos_rule(r, eos, "strip" if convention.eos == "strip" else "keep"))
        rendered = tokenizer.apply_chat_template(chat, tokenize=False)
        out.append(_eos_rule(rendered, eos, "append") if convention.eos == "append" else rendered)
    return out


def encode_full(
    tokenizer, prompts: list[str], responses: list[str], convention: Convention
) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids of each (prompt, response) under ``convention``, and token type ids where a text pair has them."""
    return tokenize(tokenizer, texts(tokenizer, prompts, responses, convention), convention)


def encode(tokenizer, prompts: list[str], responses: list[str], convention: Convention) -> list[list[int]]:
    """Token ids of each (prompt, response) under ``convention``."""
    return encode_full(tokenizer, prompts, responses, convention)[0]


def tokenize(tokenizer, items: list, convention: Convention) -> tuple[list[list[int]], list[list[int]] | None]:
    """Tokenize :func:`texts`' output: special tokens, truncation and BOS de-duplication by ``convention``."""
    if not items:
        return [], None
    kwargs = dict(add_special_tokens=convention.add_special_tokens)
    if convention.max_length is not None:
        kwargs.update(truncation=True, max_length=convention.max_length)
    side = tokenizer.truncation_side
    if convention.truncation_side is not None:
        tokenizer.truncation_side = convention.truncation_side
    try:
        if convention.text == "pair":
            out = tokenizer([q for q, _ in items], [a for _, a in items], **kwargs)
        else:
            out = tokenizer(items, **kwargs)
    finally:
        tokenizer.truncation_side = side
    ids = [list(x) for x in out["input_ids"]]
    bos = tokenizer.bos_token_id
    if convention.dedup_bos and bos is not None:
        ids = [x[1:] if x[:2] == [bos, bos] else x for x in ids]
    types = out.get("token_type_ids") if convention.text == "pair" else None
    return ids, [list(t) for t in types] if types is not None else None
