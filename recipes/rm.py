"""Reward-model stage: TRL's RewardTrainer from the SFT model on the RM-train pairs, then honest evaluation.

accelerate launch --config_file accelerate_configs/cpu.yaml recipes/rm.py --config recipes/configs/tiny/rm.yaml
make rm [CONFIG=...] [ARGS="--field value ..."]
A reward ensemble: ARGS="--ensemble_size 5" (5 bootstrapped score heads, one run) or add "--ensemble_kind seeds"
(5 whole RMs into output_dir/member-<e>); either folder is then scored as an ensemble (reward_aggregation).
"""

import hhrm  # noqa: F401  (first: quiets bitsandbytes' optional-kernels warning)

# isort: split
from trl import ModelConfig, TrlParser

from hhrm import data, finite, modeling, outputs, reporting
from hhrm.reward import scoring
from hhrm.rm import evaluation as rm_eval
from hhrm.rm import seeds
from hhrm.rm import stage as rm
from hhrm.runtime import setup_logging


def main(data_args: data.DataArguments, args: rm.RewardConfig, model_args: ModelConfig) -> dict:
    if args.ensemble_kind == "seeds" and args.ensemble_size > 1:
        # E whole RMs by this recipe, seeds seed..seed+E-1, into output_dir/member-<e>; output_dir/ensemble.json
        return seeds.train(main, data_args, args, model_args)

    ################
    # Output folder, tokenizer and pairs: tokenized once (text + EOS), pairs over max_length dropped and counted
    ################
    outputs.check_output_dir(args.output_dir, "rm", args.overwrite_output_dir)
    rm.check_model_path(model_args)
    tokenizer = modeling.load_tokenizer(model_args, args=args)
    pairs = rm.prepare_pairs(data.load_splits(data_args, tokenizer), tokenizer, args.max_length, args.dedup_test)

    ################
    # Model: a sequence classifier with one label (E bootstrapped heads: ensemble_kind=heads), freshly initialised
    ################
    model = rm.load_reward_model(model_args, args, tokenizer)
    outputs.check_free_space(args.output_dir, outputs.model_bytes(model))  # the new model must fit beside the old
    metrics: dict = {}
    if args.eval_before_training and len(pairs.test):
        scorer = scoring.RewardScorer(model, tokenizer, batch_size=args.reward_batch_size)
        metrics["eval_accuracy_exact_before"] = rm_eval.evaluate_pairs(scorer, pairs.test)[0]["eval_accuracy_exact"]

    ################
    # Training
    ################
    # hhrm's RewardTrainer: length-grouped batches (default), padding-free rows when args.padding_free
    trainer = rm.make_trainer(model, args, pairs, tokenizer, model_args)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    finite.check_trained(trainer, result, "reward-model training", {"learning_rate": args.learning_rate})

    ################
    # Export a plain folder, evaluate it, write metrics, eval_rm.json, data report and model card, all into a staging
    # folder that replaces the old model's files only once complete: a failure (a full disk) leaves the old model whole
    ################
    metrics = reporting.train_metrics(result.metrics, args.resume_from_checkpoint) | metrics
    configs = {"data": data_args, "training": args, "model": model_args}
    with outputs.staged(args.output_dir, trainer.accelerator, outputs.model_bytes(model)) as folder:
        rm.export(trainer, folder, tokenizer, model_args)
        metrics = rm.finish(trainer, pairs, configs, metrics, folder)
    outputs.release_output_dir(args.output_dir)  # the next run into it may start (an in-process caller's too)
    trainer.accelerator.print(f"reward model saved to {args.output_dir}: " + reporting.headline(metrics, rm.HEADLINE))
    trainer.end()
    return metrics


if __name__ == "__main__":
    from hhrm.lifetime import exit_with_parent
    from hhrm.runtime import refusals_in_one_line

    with refusals_in_one_line():  # a refusal: one line `hhrm: error: ...`, exit code 2
        exit_with_parent()  # started by a supervisor (hhrm.lifetime.supervise): die with it
        parser = TrlParser((data.DataArguments, rm.RewardConfig, ModelConfig))
        data_args, args, model_args = parser.parse_args_and_config()
        setup_logging()
        main(data_args, args, model_args)
