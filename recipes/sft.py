"""SFT stage: the chosen dialogues of the RM-train pairs, packed (the card's recipe), with TRL's SFTTrainer.

accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft.py --config recipes/configs/tiny/sft.yaml
make sft [CONFIG=...] [ARGS="--field value ..."]
"""

from transformers import AutoModelForCausalLM
from trl import ModelConfig, SFTTrainer, TrlParser, get_peft_config

from hhrm import data, modeling, reporting, sft
from hhrm.runtime import setup_logging


def main(data_args: data.DataArguments, args: sft.SFTConfig, model_args: ModelConfig) -> dict:
    ################
    # Model and tokenizer
    ################
    tokenizer = modeling.load_tokenizer(model_args)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, **modeling.model_init_kwargs(model_args, args)
    )
    modeling.match_vocab(model, tokenizer)

    ################
    # Data: chosen dialogues of the RM-train rows; held-out RM-test dialogues for the eval loss
    ################
    splits = data.load_splits(data_args)
    train_ds, eval_ds = sft.sft_datasets(splits, args.eval_rows)

    ################
    # Training
    ################
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    before = trainer.evaluate() if eval_ds is not None else {}
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    ################
    # Save (LoRA merged), evaluate, write metrics, data report and model card
    ################
    modeling.save_merged(trainer, args.output_dir, tokenizer)
    metrics = reporting.train_metrics(result.metrics)
    if "eval_loss" in before:
        metrics["eval_loss_before"] = before["eval_loss"]
    metrics = sft.finish(trainer, splits, {"data": data_args, "training": args, "model": model_args}, metrics)
    trainer.accelerator.print(f"SFT model saved to {args.output_dir}: " + reporting.headline(metrics, sft.HEADLINE))
    trainer.end()
    return metrics


if __name__ == "__main__":
    parser = TrlParser((data.DataArguments, sft.SFTConfig, ModelConfig))
    data_args, args, model_args = parser.parse_args_and_config()
    setup_logging()
    main(data_args, args, model_args)
