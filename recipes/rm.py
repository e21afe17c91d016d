"""Reward-model stage: `accelerate launch recipes/rm.py --config recipes/configs/tiny/rm.yaml [--field value ...]`."""

from trl import ModelConfig, RewardTrainer, TrlParser

from hhrm import data, modeling, rm, rm_eval, scoring
from hhrm.runtime import setup_logging


def main() -> None:
    data_args, args, model_args = TrlParser((data.DataArguments, rm.RewardConfig, ModelConfig)).parse_args_and_config()
    setup_logging()
    rm.resolve_max_length(args, data_args)
    rm.check_model_path(model_args)
    tokenizer = modeling.load_tokenizer(model_args)
    pairs = rm.prepare_pairs(splits := data.load_splits(data_args), tokenizer, args.max_length, args.dedup_test)
    model = rm.load_reward_model(model_args, args, tokenizer)
    before = None
    if args.eval_before_training and len(pairs.test):
        scorer = scoring.RewardScorer(model, tokenizer, batch_size=args.scorer_batch_size)
        before = {"eval_accuracy_exact_before": rm_eval.evaluate_pairs(scorer, pairs.test)[0]["eval_accuracy_exact"]}
    trainer = RewardTrainer(model=model, args=args, train_dataset=rm.trainer_dataset(pairs.train),
                            eval_dataset=rm.trainer_dataset(pairs.test) if len(pairs.test) else None,
                            processing_class=tokenizer, peft_config=rm.reward_peft_config(model_args))
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    rm.export(trainer, args.output_dir, tokenizer, model_args)
    metrics = rm.finish(trainer, pairs, splits, args.output_dir, {"data": data_args, "training": args, "model": model_args},
                        result.metrics, before)
    trainer.accelerator.print(f"reward model saved to {args.output_dir}: " + rm.headline(metrics))
    trainer.end()


if __name__ == "__main__":
    main()
