"""SFT stage: the chosen dialogues of the RM-train pairs, packed (the card's recipe), with TRL's SFTTrainer.

accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft.py --config recipes/configs/tiny/sft.yaml
make sft [CONFIG=...] [ARGS="--field value ..."]
"""

import hhrm  # noqa: F401  (first: quiets bitsandbytes' optional-kernels warning)

# isort: split
from transformers import AutoModelForCausalLM
from trl import ModelConfig, SFTTrainer, TrlParser, get_peft_config

from hhrm import data, finite, model_checks, modeling, outputs, reporting, sft
from hhrm.runtime import setup_logging


def main(data_args: data.DataArguments, args: sft.SFTConfig, model_args: ModelConfig) -> dict:
    ################
    # Output folder (a finished model is only replaced when asked), model and tokenizer
    ################
    model_checks.check_policy(model_args, modeling.trust_remote_code(model_args, args))  # a causal LM, all weights
    outputs.check_output_dir(args.output_dir, "sft", args.overwrite_output_dir)
    tokenizer = modeling.load_tokenizer(model_args, args=args)  # args: --trust_remote_code reaches it too
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, **modeling.model_init_kwargs(model_args, args)
    )
    modeling.match_vocab(model, tokenizer)
    outputs.check_free_space(args.output_dir, outputs.model_bytes(model))  # the new model must fit beside the old

    ################
    # Data: chosen dialogues of the RM-train rows; held-out RM-test dialogues for the eval loss
    ################
    splits = data.load_splits(data_args, tokenizer)  # the tokenizer renders the text when use_chat_template is set
    train_ds, eval_ds = sft.sft_datasets(splits, args.eval_rows)
    train_ds, long_docs = sft.long_documents(train_ds, tokenizer, args.max_length, args.max_document_tokens)

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
    reporting.set_tensorboard_dir(trainer)  # curves in output_dir/runs, the evaluation before training included
    before = sft.evaluate_before(trainer)  # not under DeepSpeed (see there)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    finite.check_trained(trainer, result, "SFT", {"learning_rate": args.learning_rate})  # no NaN model is saved

    ################
    # Save (LoRA merged), evaluate, write metrics, data report and model card, all into a staging folder that
    # replaces the old model's files only once complete: a failure (a full disk) leaves the old model whole
    ################
    metrics = reporting.train_metrics(result.metrics, args.resume_from_checkpoint) | long_docs
    if "eval_loss" in before:
        metrics["eval_loss_before"] = before["eval_loss"]
    configs = {"data": data_args, "training": args, "model": model_args}
    with outputs.staged(args.output_dir, trainer.accelerator, outputs.model_bytes(model)) as folder:
        modeling.save_merged(trainer, folder, tokenizer)
        metrics = sft.finish(trainer, splits, configs, metrics, folder)
    outputs.release_output_dir(args.output_dir)  # the next run into it may start (an in-process caller's too)
    trainer.accelerator.print(f"SFT model saved to {args.output_dir}: " + reporting.headline(metrics, sft.HEADLINE))
    trainer.end()
    return metrics


if __name__ == "__main__":
    from hhrm.lifetime import exit_with_parent
    from hhrm.runtime import refusals_in_one_line

    with refusals_in_one_line():  # a refusal: one line `hhrm: error: ...`, exit code 2
        exit_with_parent()  # started by a supervisor (hhrm.lifetime.supervise): die with it
        parser = TrlParser((data.DataArguments, sft.SFTConfig, ModelConfig))
        data_args, args, model_args = parser.parse_args_and_config()
        setup_logging()
        main(data_args, args, model_args)
