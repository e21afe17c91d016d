"""Evaluate any reward model folder on the held-out pairs (and, on the embedded data, against the gold reward).

    python recipes/eval_rm.py --config recipes/configs/tiny/rm.yaml [--reward_model DIR] [--skip_gold true]
    make eval-rm [MODEL=DIR]

Reads the RM recipe's config: the data split, the pair-length limit (``max_length``) and
``model_name_or_path`` (the SFT policy the RM started from, which samples the fresh responses). The folder is scored
under ``--reward_convention`` (unset: what it records, else hhrm's), so another tool's RM (the seed card's:
``--reward_convention card-pipeline``) is evaluated as it was trained. Writes
``eval_rm.json`` and the evaluation section of the model card into the evaluated folder (or
``--eval_output_dir``).
"""

import hhrm  # noqa: F401  (first: quiets bitsandbytes' optional-kernels warning)

# isort: split
import json
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, TrlParser

from hhrm import data, runtime
from hhrm.reward import sources
from hhrm.rm import evaluation as rm_eval
from hhrm.rm import stage as rm
from hhrm.runtime import setup_logging


@dataclass
class EvalArguments:
    """What is evaluated, on top of the RM recipe's config."""

    reward_model: str | None = field(default=None, metadata={"help": "Reward model folder. Default: output_dir."})
    policy_model: str | None = field(
        default=None,
        metadata={"help": "Policy that samples fresh responses. Default: model_name_or_path (the SFT model)."},
    )
    eval_output_dir: str | None = field(
        default=None,
        metadata={"help": "Where eval_rm.json and the card section go. Default: the reward model folder."},
    )
    skip_gold: bool = field(default=False, metadata={"help": "Skip the gold agreement on fresh samples."})
    reward_convention: str | None = sources.setting("reward_convention")


def main(
    data_args: data.DataArguments, args: rm.RewardConfig, model_args: ModelConfig, eval_args: EvalArguments
) -> dict:
    ################
    # The reward model and the held-out pairs, made exactly as the RM recipe makes them
    ################
    reward_model = Path(eval_args.reward_model or args.output_dir)
    if not (reward_model / "config.json").is_file():
        raise FileNotFoundError(f"reward_model={str(reward_model)!r}: no model folder there (train it with `make rm`)")
    scorer = sources.LocalModel(
        str(reward_model), eval_args.reward_convention, dtype=runtime.torch_dtype(args.bf16),
        batch_size=args.reward_batch_size, setting="reward_model",
    ).scorer  # fmt: skip
    splits = data.load_splits(data_args, scorer.tokenizer)  # the tokenizer renders the text when use_chat_template
    pairs = rm.prepare_pairs(splits, scorer.tokenizer, args.max_length, args.dedup_test)

    ################
    # Evaluation; eval_rm.json and the model card's evaluation section
    ################
    policy = None if eval_args.skip_gold else (eval_args.policy_model or model_args.model_name_or_path)
    result = rm_eval.evaluate(scorer, pairs.test, args, policy, train_prompts=set(pairs.train["prompt"]))
    metrics = pairs.counts | result["metrics"]
    out = Path(eval_args.eval_output_dir or reward_model)
    about = {"counts": pairs.counts, "reward_model": str(reward_model), "reward_convention": scorer.convention.name}
    rm_eval.write_results(result | about, out / "eval_rm.json")
    rm_eval.update_card(out, rm_eval.card_section(metrics, result["held_out"], str(reward_model)))
    print(json.dumps(metrics, indent=2, default=float))
    return metrics


if __name__ == "__main__":
    from hhrm.lifetime import exit_with_parent

    with runtime.refusals_in_one_line():  # a refusal: one line `hhrm: error: ...`, exit code 2
        exit_with_parent()  # started by a supervisor (hhrm.lifetime.supervise): die with it
        parser = TrlParser((data.DataArguments, rm.RewardConfig, ModelConfig, EvalArguments))
        data_args, args, model_args, eval_args = parser.parse_args_and_config()
        setup_logging()
        main(data_args, args, model_args, eval_args)
