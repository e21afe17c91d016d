"""The reward model's card: what it is, its evaluation, and how to use it (the card's pipeline snippet, fixed).

The snippet is the LMFlow card's ``pipeline`` usage in the form that runs on transformers 5.23, its input following
the convention the folder records (``reward_convention``: hhrm appends EOS, card-pipeline does not); the tests
execute this very text, so the card never shows code that does not run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hhrm import reporting
from hhrm.reward import conventions

# The card's snippet in the form that runs on transformers 5.23; tests exec this very text.
PIPELINE_SNIPPET = """\
import torch
from transformers import AutoTokenizer, pipeline

MODEL = "{path}"
rm_tokenizer = AutoTokenizer.from_pretrained(MODEL)
rm_pipe = pipeline(
    "sentiment-analysis",          # alias of "text-classification"
    model=MODEL,
    tokenizer=rm_tokenizer,
    device="cpu",                  # the card's device="auto" raises on transformers 5: use 0, "cuda" or device_map
    dtype=torch.float32,           # bf16 on a GPU; the card's model_kwargs={{"torch_dtype": ...}} is deprecated
)
pipe_kwargs = {{
    "top_k": None,                 # replaces the removed return_all_scores=True: one list of scores per text
    "function_to_apply": "none",   # the raw reward, not a sigmoid
    "batch_size": {batch_size},
}}
test_texts = [
    "###Human: My daughter wants to know how to convert fractions to decimals, but I'm not sure how to "
    "explain it. Can you help? ###Assistant: Sure. So one way of converting fractions to decimals is to ask "
    "\\u201chow many halves are there?\\u201d and then write this as a decimal number.",
    "###Human: I have fresh whole chicken in my fridge. What dish can I prepare using it that will take me "
    "less than an hour to cook? ###Assistant: Are you interested in a quick and easy recipe you can prepare "
    "with chicken you have on hand, or something more involved?",
]
{inputs}rewards = [output[0]["score"] for output in pipe_outputs]
"""
# The pipeline's input by the convention's EOS rule; the rest (the tokenizer's special tokens, the head's reading
# position) is the pipeline's own, as in every convention :func:`pipeline_reproduces` accepts.
PIPELINE_INPUTS = {
    "append": "# The reward model was trained on text + EOS (TRL's RewardTrainer appends it): score the same text.\n"
    "pipe_outputs = rm_pipe([text + rm_tokenizer.eos_token for text in test_texts], **pipe_kwargs)\n",
    "keep": "# The reward model scores the text as given: no EOS appended.\n"
    "pipe_outputs = rm_pipe(test_texts, **pipe_kwargs)\n",
}
HOW = {"append": "Append EOS to each text, as", "keep": "Give each text as it is (no EOS appended), as"}

SCORER_SNIPPET = """\
from hhrm.reward.scoring import RewardScorer

scorer = RewardScorer.from_pretrained("{path}")        # batches by length; scores by reward_convention={name!r}
rewards = scorer.score(test_texts)                        # full texts, or:
rewards = scorer.score_pairs(prompts, responses)          # prompt ends with " ###Assistant:", response with " "
"""


def pipeline_reproduces(convention: conventions.Convention) -> bool:
    """Whether the text-classification pipeline, given the texts as :data:`PIPELINE_INPUTS` writes, scores as
    ``convention`` does."""
    c = convention
    plain = c.text == "concat" and c.add_special_tokens and not c.dedup_bos and c.max_length is None
    return plain and c.read_at == "last_non_pad" and c.activation == "none" and c.eos in PIPELINE_INPUTS


def pipeline_snippet(path: str | Path, batch_size: int = 1, convention: str = "hhrm") -> str:
    """The pipeline snippet for a folder scored by the preset ``convention`` (config.json's ``reward_convention``)."""
    rule = conventions.by_name(convention)
    if not pipeline_reproduces(rule):
        raise ValueError(f"reward_convention={convention!r}: the text-classification pipeline does not score by it")
    return PIPELINE_SNIPPET.format(path=str(path), batch_size=batch_size, inputs=PIPELINE_INPUTS[rule.eos])


HEADS_NOTE = (
    "An ensemble of {heads} score heads on one backbone (config.json `reward_heads`; ensemble_kind=heads), each "
    "trained on its own bootstrap of the pairs. hhrm scores it as an ensemble (`--reward_model_name_or_path` "
    "{path}, `--reward_aggregation mean|worst|uwo`); `RewardScorer` below gives the heads' mean, and "
    "`scorer.score_pairs_heads(prompts, responses)` every head. The `pipeline` snippet does not apply: it would "
    "report the largest head.\n\n"
)


def usage(path: str | Path, convention: str = "hhrm", heads: int = 1) -> str:
    scorer = SCORER_SNIPPET.format(path=path, name=convention)
    text = f"hhrm's batched scorer (what RAFT uses):\n\n```python\n{scorer}```\n"
    if heads > 1:
        return HEADS_NOTE.format(heads=heads, path=path) + text
    if not pipeline_reproduces(rule := conventions.by_name(convention)):
        return text
    return (
        'The card\'s `pipeline` snippet, in the form that runs on transformers 5.23 (`device="auto"` raises '
        f"and `return_all_scores` is silently ignored there). {HOW[rule.eos]} the `{convention}` convention that "
        "config.json records (`reward_convention`) does, so these rewards equal hhrm's scorer and the evaluation "
        f"below.\n\n```python\n{pipeline_snippet(path, convention=convention)}```\n\n{text}"
    )


def model_card(
    output_dir: Path,
    configs: dict[str, Any],
    metrics: dict[str, Any],
    report: dict[str, Any],
    convention: str = "hhrm",
    heads: int = 1,
) -> reporting.ModelCard:
    args = configs["training"]
    steps = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    nan = float("nan")
    return reporting.ModelCard(
        title=f"Reward model from {configs['model'].model_name_or_path} on HH-RLHF pairs (hhrm)",
        summary=(
            "Bradley-Terry reward model trained with TRL `RewardTrainer` (`AutoModelForSequenceClassification`, "
            f"`num_labels={heads}`) on the RM-train pairs of the card's split, {metrics.get('train_pairs')} pairs "
            f"after dropping {metrics.get('pairs_dropped_long')} over {metrics.get('max_pair_tokens')} tokens "
            f"(dropped, never truncated). lr {args.learning_rate}, {args.num_train_epochs} epoch(s), `{schedule}` "
            f"schedule, {steps} pairs per optimizer step. The reward of a text is the score at its final EOS token "
            "(the text is `###Human: ... ###Assistant: ...` + EOS).\n\n"
            f"Held-out (RM-test, {metrics.get('eval_pairs')} pairs, none also in RM-train): exact accuracy "
            f"{metrics.get('eval_accuracy_exact', nan):.4f} (ties count as wrong), mean Bradley-Terry loss "
            f"{metrics.get('eval_bt_loss', nan):.4f}. Length bias: Pearson correlation of reward with "
            f"response length {metrics.get('eval_reward_length_pearson', nan):.3f}; the longer response "
            f"wins {metrics.get('eval_longer_preferred_rate', nan):.3f} of pairs (the data's chosen response "
            f"is the longer one in {metrics.get('eval_data_chosen_longer_rate', nan):.3f}). Accuracy by "
            "length bucket is below and in `eval_rm.json`."
        ),
        metrics=metrics,
        configs=configs,
        data={
            "source": report["source"],
            "bad_rows": report["bad_rows"],
            **{k: report[k] for k in ("train", "test") if k in report},
        },
        usage=usage(output_dir, convention, heads),
        pipeline_tag="text-classification",
    )
