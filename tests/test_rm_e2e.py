"""End to end: the RM recipe trains, exports a loadable folder and evaluates it; LoRA keeps its head."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hhrm import data
from hhrm.reward import scoring
from hhrm.rm import card as rm_card
from hhrm.rm import stage as rm

from conftest import QUIET_CPU, run_process

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    proc = run_process([sys.executable, *args], 150, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_rm_recipe_trains_exports_and_evaluates(tiny, tmp_path):
    out = tmp_path / "rm"
    cfg = {
        "model_name_or_path": str(tiny["base"]),
        "dataset_name": str(tiny["data"]),
        "test_offset": 100,
        "output_dir": str(out),
        "num_train_epochs": 6,
        "learning_rate": 1.0e-3,
        "lr_scheduler_type": "linear",
        "global_batch_size": 16,
        "per_device_train_batch_size": 8,
        "activation_checkpointing": False,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        "gold_prompts": 20,
        "gold_samples_per_prompt": 2,
        "gold_max_new_tokens": 12,
    }
    config = tmp_path / "rm.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run(["recipes/rm.py", "--config", str(config)], tmp_path)

    metrics = json.loads((out / "metrics.json").read_text())
    # Trained from a random tiny Llama for a few short epochs: clearly above chance and above the untrained head.
    assert metrics["eval_accuracy_exact"] > 0.6
    assert metrics["eval_accuracy_exact"] > metrics["eval_accuracy_exact_before"] + 0.05
    assert metrics["eval_pairs_overlapping_train"] >= 0 and metrics["pairs_dropped_long"] == 0
    for key in (
        "eval_bt_loss",
        "eval_reward_mean",
        "eval_reward_std",
        "eval_reward_length_pearson",
        "gold_auc",
        "gold_pairwise_agreement",
        "train_runtime",
    ):
        assert key in metrics, key
    assert any(k.startswith("eval_accuracy_len_") for k in metrics)

    # The export: plain folder, one label, pad id recorded, loadable without hhrm or peft.
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    card = (out / "README.md").read_text()
    assert '"function_to_apply": "none"' in card and '"top_k": None' in card and "eval_accuracy_exact" in card
    assert rm_card.pipeline_snippet(out) in card  # the card shows exactly the snippet run below
    scope: dict = {}
    exec(rm_card.pipeline_snippet(out, 2), scope)
    scorer = scoring.RewardScorer.from_pretrained(out)
    assert scope["rewards"] == pytest.approx(scorer.score(scope["test_texts"]), abs=1e-5)

    # The eval recipe alone reproduces the recipe's headline numbers on the same folder.
    eval_dir = tmp_path / "eval"
    run(
        ["recipes/eval_rm.py", "--config", str(config), "--skip_gold", "true", "--eval_output_dir", str(eval_dir)],
        tmp_path,
    )
    result = json.loads((eval_dir / "eval_rm.json").read_text())
    assert result["metrics"]["eval_accuracy_exact"] == pytest.approx(metrics["eval_accuracy_exact"], abs=1e-9)
    assert result["metrics"]["eval_bt_loss"] == pytest.approx(metrics["eval_bt_loss"], rel=1e-6)
    assert "recipes/eval_rm.py" in (eval_dir / "README.md").read_text()


@pytest.mark.slow
def test_lora_head_survives_save_reload_and_merge(tiny, tmp_path):
    from peft import PeftModel
    from trl import ModelConfig, RewardTrainer

    model_args = ModelConfig(
        model_name_or_path=str(tiny["base"]),
        use_peft=True,
        lora_r=8,
        lora_alpha=16,
        lora_target_modules=["q_proj", "v_proj"],
    )
    args = rm.RewardConfig(
        output_dir=str(tmp_path / "lora"),
        **QUIET_CPU,
        max_steps=8,
        learning_rate=1e-2,
        per_device_train_batch_size=8,
        max_length=512,
        logging_steps=100,
    )
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    splits = data.load_splits(data.DataArguments(dataset_name=str(tiny["data"]), test_offset=100, max_test_rows=140))
    pairs = rm.prepare_pairs(splits, tok, 512)
    model = rm.load_reward_model(model_args, args, tok)
    head_before = model.score.weight.detach().clone()
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=rm.trainer_dataset(pairs.train),
        processing_class=tok,
        peft_config=rm.reward_peft_config(model_args),
    )
    trainer.train()
    texts = [p + c for p, c in zip(pairs.test["prompt"], pairs.test["chosen"])][:16]
    trained = trainer.accelerator.unwrap_model(trainer.model)
    head_after = [p for n, p in trained.named_parameters() if "score" in n and p.requires_grad]
    assert head_after and not torch.allclose(head_after[0].detach(), head_before)  # the head trained
    in_memory = scoring.RewardScorer(trained, tok).score(texts)

    out = rm.export(trainer, tmp_path / "export", tok, model_args)
    merged = scoring.RewardScorer.from_pretrained(out).score(texts)
    assert merged == pytest.approx(in_memory, abs=1e-4)
    assert not (out / "adapter_config.json").exists()  # the export is a merged, plain model
    base = AutoModelForSequenceClassification.from_pretrained(tiny["base"], num_labels=1)
    base.config.pad_token_id = tok.pad_token_id
    adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    assert scoring.RewardScorer(adapter, tok).score(texts) == pytest.approx(in_memory, abs=1e-4)
