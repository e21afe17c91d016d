"""SFT stage: `accelerate launch recipes/sft.py --config recipes/configs/tiny/sft.yaml [--field value ...]`."""

from transformers import AutoModelForCausalLM
from trl import ModelConfig, SFTTrainer, TrlParser

from hhrm import data, modeling, sft
from hhrm.runtime import setup_logging


def main() -> None:
    data_args, args, model_args = TrlParser((data.DataArguments, sft.SFTConfig, ModelConfig)).parse_args_and_config()
    setup_logging()
    tokenizer = modeling.load_tokenizer(model_args)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **modeling.model_init_kwargs(model_args, args))
    modeling.match_vocab(model, tokenizer)
    splits = data.load_splits(data_args)
    train_ds, eval_ds = sft.sft_datasets(splits, args.eval_rows)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=modeling.peft_config(model_args))
    before = trainer.evaluate() if eval_ds is not None else None
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    modeling.save_merged(trainer, args.output_dir, tokenizer)
    metrics = sft.finish(trainer, splits, args.output_dir, {"data": data_args, "training": args, "model": model_args},
                         result.metrics, before)
    trainer.accelerator.print(f"SFT model saved to {args.output_dir}: " + sft.headline(metrics))
    trainer.end()


if __name__ == "__main__":
    main()
