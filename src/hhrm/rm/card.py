"""The reward model's card: what it is, its evaluation, and how to use it (the card's pipeline snippet, fixed).

The snippet is the LMFlow card's ``pipeline`` usage in the form that runs on transformers 5.23; the
tests execute this very text, so the card never shows code that does not run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hhrm import reporting

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
# The reward model was trained on text + EOS (TRL's RewardTrainer appends it): score the same text.
pipe_outputs = rm_pipe([text + rm_tokenizer.eos_token for text in test_texts], **pipe_kwargs)
rewards = [output[0]["score"] for output in pipe_outputs]
"""

SCORER_SNIPPET = """\
from hhrm.reward.scoring import RewardScorer

scorer = RewardScorer.from_pretrained("{path}")        # batches by length, appends EOS itself
rewards = scorer.score(test_texts)                        # full texts, or:
rewards = scorer.score_pairs(prompts, responses)          # prompt ends with " ###Assistant:", response with " "
"""


def pipeline_snippet(path: str | Path, batch_size: int = 1) -> str:
    return PIPELINE_SNIPPET.format(path=str(path), batch_size=batch_size)


def usage(path: str | Path) -> str:
    return (
        'The card\'s `pipeline` snippet, in the form that runs on transformers 5.23 (`device="auto"` raises '
        "and `return_all_scores` is silently ignored there). Append EOS to each text: every path in hhrm "
        "scores `text + eos`, so these rewards equal hhrm's scorer and the evaluation below.\n\n"
        f"```python\n{pipeline_snippet(path)}```\n\n"
        f"hhrm's batched scorer (what RAFT uses):\n\n```python\n{SCORER_SNIPPET.format(path=path)}```\n"
    )


def model_card(
    output_dir: Path, configs: dict[str, Any], metrics: dict[str, Any], report: dict[str, Any]
) -> reporting.ModelCard:
    args = configs["training"]
    steps = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    nan = float("nan")
    return reporting.ModelCard(
        title=f"Reward model from {configs['model'].model_name_or_path} on HH-RLHF pairs (hhrm)",
        summary=(
            "Bradley-Terry reward model trained with TRL `RewardTrainer` (`AutoModelForSequenceClassification`, "
            f"`num_labels=1`) on the RM-train pairs of the card's split, {metrics.get('train_pairs')} pairs after "
            f"dropping {metrics.get('pairs_dropped_long')} over {metrics.get('max_pair_tokens')} tokens (dropped, "
            f"never truncated). lr {args.learning_rate}, {args.num_train_epochs} epoch(s), `{schedule}` schedule, "
            f"{steps} pairs per optimizer step. The reward of a text is the score at its final EOS token "
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
        usage=usage(output_dir),
        pipeline_tag="text-classification",
    )
