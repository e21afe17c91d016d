import json
import os
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, SFTTrainer, get_peft_config

from hhrm import data, sft

from conftest import load_recipe, run_process, tensorboard_scalars

ROOT = Path(__file__).resolve().parents[1]
TINY_SFT = ROOT / "recipes" / "configs" / "tiny" / "sft.yaml"


def _splits(tiny):
    return data.load_splits(data.DataArguments(dataset_name=str(tiny["data"]), test_offset=100))


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_length=128,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        activation_checkpointing=False,
        save_strategy="no",
        report_to="none",
        logging_steps=5,
        seed=0,
    )
    base.update(kw)
    return sft.SFTConfig(**base)


def test_precision_follows_the_device():
    args = sft.SFTConfig(output_dir="unused", activation_checkpointing=False)
    import torch

    assert args.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert sft.SFTConfig(output_dir="unused", bf16=False, activation_checkpointing=False).bf16 is False
    # The card's packing is the default: concatenate texts, cut fixed-size chunks.
    assert args.packing and args.packing_strategy == "wrapped" and args.max_length == 1024


def test_packing_gives_full_chunks_without_padding(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    train, _ = sft.sft_datasets(_splits(tiny), eval_rows=0)
    trainer = SFTTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=train, processing_class=tok)
    rows = trainer.train_dataset["input_ids"]
    lengths = [len(r) for r in rows]
    assert all(n == 128 for n in lengths[:-1]) and 0 < lengths[-1] <= 128
    assert not any(tok.pad_token_id in r for r in rows)  # no padding inside chunks
    total = sum(len(t) + 1 for t in tok(list(train["text"]), add_special_tokens=False)["input_ids"])  # +EOS each
    assert sum(lengths) == total  # every token kept, nothing truncated
    eos_count = sum(r.count(tok.eos_token_id) for r in rows)
    assert eos_count == len(train)  # documents separated by EOS inside chunks


def test_sft_recipe_lowers_eval_loss_and_writes_a_model_folder(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    args = _args(
        tmp_path, max_steps=40, eval_rows=100, gold_eval_prompts=40, gold_max_new_tokens=16, report_to="tensorboard"
    )
    data_args = data.DataArguments(dataset_name=str(tiny["data"]), test_offset=100)
    metrics = load_recipe("sft").main(data_args, args, ModelConfig(model_name_or_path=str(tiny["base"])))
    before = {"eval_loss": metrics["eval_loss_before"]}
    assert metrics["eval_loss"] < 0.6 * before["eval_loss"]
    assert 0.0 <= metrics["gold_accuracy"] <= 1.0 and metrics["gold_prompts"] == 40
    out = Path(args.output_dir)
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "README.md",
        "metrics.json",
        "data_report.json",
    ):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "eval_loss" in card and "gold_accuracy" in card and '"learning_rate": 0.003' in card
    assert AutoModelForCausalLM.from_pretrained(out).config.pad_token_id == tok.pad_token_id
    curves = tensorboard_scalars(out / "runs")  # the trainer's curves, where the README says to look
    assert [step for step, _ in curves["train/loss"]] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert curves["train/loss"][-1][1] < curves["train/loss"][0][1]


@pytest.mark.slow
def test_two_process_sft_run(tiny, tmp_path):
    """`accelerate launch` with the multi-CPU config starts 2 gloo processes that train and save once."""
    out = tmp_path / "sft2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / "multi_cpu.yaml"),
        str(ROOT / "recipes" / "sft.py"),
        "--config",
        str(TINY_SFT),
        "--model_name_or_path",
        str(tiny["base"]),
        "--dataset_name",
        str(tiny["data"]),
        "--test_offset",
        "100",
        "--max_steps",
        "6",
        "--max_length",
        "128",
        "--eval_rows",
        "32",
        "--gold_eval_prompts",
        "8",
        "--output_dir",
        str(out),
        "--ddp_find_unused_parameters",
        "false",
    ]
    proc = run_process(cmd, 60, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("quantize", [False, True], ids=["lora", "qlora-4bit"])
def test_lora_sft_saves_a_merged_plain_model(tiny, tmp_path, quantize):
    from hhrm import modeling

    model_args = ModelConfig(
        model_name_or_path=str(tiny["base"]),
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        load_in_4bit=quantize,
    )
    args = _args(tmp_path, max_steps=2)
    tok = modeling.load_tokenizer(model_args)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, **modeling.model_init_kwargs(model_args, args)
    )
    train, _ = sft.sft_datasets(_splits(tiny), eval_rows=0)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train.select(range(64)),
        processing_class=tok,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    out = modeling.save_merged(trainer, tmp_path / "merged", tok)
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_long_documents_are_counted_and_capped(tiny):
    from datasets import Dataset

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    short = "###Human: Hi ###Assistant: Hello."
    giant = "###Human: " + "apple river " * 400 + "###Assistant: ok"
    train = Dataset.from_dict({"text": [short, giant, short]})
    kept, report = sft.long_documents(train, tok, max_length=64, cap=None)
    assert len(kept) == 3 and report["sft_documents_over_max_length"] == 1
    assert report["sft_longest_document_tokens"] > 400
    kept, report = sft.long_documents(train, tok, max_length=64, cap=100)
    assert list(kept["text"]) == [short, short] and report["sft_documents_dropped_over_cap"] == 1
    with pytest.raises(ValueError, match="max_document_tokens=1"):
        sft.long_documents(train, tok, max_length=64, cap=1)
    with pytest.raises(ValueError, match="max_document_tokens=0"):
        _args(Path("unused"), max_document_tokens=0)
