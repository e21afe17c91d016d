"""Each of TRL's preference formats end to end: SFT, RM, RM evaluation and scoring run on it, with the same pairs.

The embedded data (raw HH dialogues) is rewritten as TRL conversational and standard rows, and once rendered with
a chat template; the real HH sample, when HHRM_HH_SAMPLE names it, is rewritten as conversational rows too. Each
run is a few optimizer steps: what is checked is that every stage accepts the format and sees the same pairs.
"""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from trl import ModelConfig

from hhrm import data, formats, sft
from hhrm.data_io import read_rows
from hhrm.reporting import read_jsonl
from hhrm.reward import score_file
from hhrm.rm import stage as rm

from conftest import load_recipe

pytestmark = pytest.mark.slow
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def as_format(row: dict, fmt: str) -> dict | None:
    """A raw HH row as a TRL row of ``fmt`` (``None`` where the format cannot hold it: standard needs one turn)."""
    context, chosen, rejected = formats.pair_parts(row, "raw")
    if fmt == "conversational":  # implicit prompt: whole conversations
        return {
            "chosen": [*context, {"role": "assistant", "content": chosen}],
            "rejected": [*context, {"role": "assistant", "content": rejected}],
        }
    if fmt == "conversational_explicit":
        return {
            "prompt": context,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    if len(context) != 1:
        return None
    return {"prompt": context[0]["content"], "chosen": " " + chosen, "rejected": " " + rejected}


def convert(source: Path, out: Path, fmt: str, rows: dict[str, slice] | None = None) -> Path:
    out.mkdir(parents=True)
    for split in ("train", "test"):
        raw = read_rows(str(source), split) if rows is None else read_rows(str(source), "x")[rows[split]]
        converted = [r for r in (as_format(x, fmt) for x in raw) if r is not None]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in converted))
    return out


def pipeline(folder: Path, base: Path, out: Path, test_offset: int, chat_template: bool = False) -> dict:
    """SFT -> RM -> eval_rm -> score on ``folder``, a few steps each; returns what each stage reported."""
    data_args = data.DataArguments(dataset_name=str(folder), test_offset=test_offset, use_chat_template=chat_template)
    common = dict(activation_checkpointing=False, save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
    sft_args = sft.SFTConfig(
        output_dir=str(out / "sft"),
        max_steps=3,
        per_device_train_batch_size=4,
        max_length=512,
        eval_rows=16,
        gold_eval_prompts=0,
        **common,
    )
    sft_metrics = load_recipe("sft").main(data_args, sft_args, ModelConfig(model_name_or_path=str(base)))
    rm_args = rm.RewardConfig(
        output_dir=str(out / "rm"),
        max_steps=3,
        per_device_train_batch_size=4,
        gold_prompts=0,
        eval_before_training=False,
        **common,
    )
    rm_metrics = load_recipe("rm").main(data_args, rm_args, ModelConfig(model_name_or_path=str(out / "sft")))
    eval_recipe = load_recipe("eval_rm")
    eval_args = eval_recipe.EvalArguments(
        reward_model=str(out / "rm"), eval_output_dir=str(out / "eval"), skip_gold=True
    )
    eval_metrics = eval_recipe.main(data_args, rm_args, ModelConfig(model_name_or_path=str(out / "sft")), eval_args)
    score_data = score_file.ScoreDataArguments(
        dataset_name=str(folder / "test.jsonl"), use_chat_template=chat_template
    )
    score_args = score_file.ScoreConfig(output_file=str(out / "scores.jsonl"), progress=False)
    score_metrics = load_recipe("score").main(score_data, score_args, ModelConfig(model_name_or_path=str(out / "rm")))
    return {"sft": sft_metrics, "rm": rm_metrics, "eval": eval_metrics, "score": score_metrics}


@pytest.fixture(scope="module")
def raw_pairs(tiny) -> dict[str, int]:
    """Pair counts of the embedded data read as raw HH (what every other format must reproduce)."""
    splits = data.load_splits(data.DataArguments(dataset_name=str(tiny["data"]), test_offset=100))
    return {"train": len(splits.train), "test": len(splits.test)}


@pytest.mark.parametrize("fmt", ["conversational", "conversational_explicit", "standard"])
def test_each_trl_format_runs_every_stage(tiny, raw_pairs, tmp_path, fmt):
    folder = convert(tiny["data"], tmp_path / "data", fmt)
    got = pipeline(folder, tiny["base"], tmp_path, test_offset=100)
    test_rows = len(read_jsonl(folder / "test.jsonl"))
    if fmt != "standard":  # every embedded row is conversational; standard keeps the single-turn ones
        assert got["rm"]["train_pairs"] == raw_pairs["train"]
        assert got["rm"]["eval_pairs"] + got["rm"]["eval_pairs_overlapping_train"] == raw_pairs["test"]
    assert got["eval"]["eval_accuracy_exact"] == got["rm"]["eval_accuracy_exact"]
    assert got["score"]["rows"] == got["score"]["scored"] == test_rows and got["score"]["bad_rows"] == 0
    assert "eval_loss" in got["sft"]


def test_chat_template_runs_every_stage(tiny, raw_pairs, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny["base"], base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = CHATML
    tok.save_pretrained(base)
    folder = convert(tiny["data"], tmp_path / "data", "conversational")
    got = pipeline(folder, base, tmp_path, test_offset=100, chat_template=True)
    assert got["rm"]["train_pairs"] == raw_pairs["train"]
    assert got["eval"]["eval_accuracy_exact"] == got["rm"]["eval_accuracy_exact"]
    assert got["score"]["scored"] == len(read_jsonl(folder / "test.jsonl")) and got["score"]["bad_rows"] == 0
    rm_tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert rm_tok.chat_template == CHATML  # the RM folder carries the rule its texts were rendered with
    # RAFT on the chat-template prompts: one short iteration, its samples drawn after the template's prompt.
    from hhrm.raft import RaftConfig

    raft_args = RaftConfig(
        output_dir=str(tmp_path / "raft"),
        reward_model_name_or_path=str(tmp_path / "rm"),
        num_iterations=1,
        prompts_per_iteration=8,
        num_samples=2,
        max_new_tokens=8,
        heldout_prompts=4,
        max_length=128,
        per_device_train_batch_size=4,
        progress=False,
        disable_tqdm=True,
        report_to="none",
        offload_models=False,
    )
    data_args = data.DataArguments(dataset_name=str(folder), test_offset=100, use_chat_template=True)
    load_recipe("raft").main(data_args, raft_args, ModelConfig(model_name_or_path=str(tmp_path / "sft")))
    scored = read_jsonl(tmp_path / "raft" / "iter_000" / "scored.jsonl")
    # A reward model trained without the policy's template would score text it never saw: refused up front.
    shutil.copytree(tmp_path / "rm", tmp_path / "rm_plain")
    plain = AutoTokenizer.from_pretrained(tmp_path / "rm_plain")
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "rm_plain")
    (tmp_path / "rm_plain" / "chat_template.jinja").unlink(missing_ok=True)
    other = replace(
        raft_args, output_dir=str(tmp_path / "raft2"), reward_model_name_or_path=str(tmp_path / "rm_plain")
    )
    with pytest.raises(ValueError, match="another chat_template than the policy"):
        load_recipe("raft").main(data_args, other, ModelConfig(model_name_or_path=str(tmp_path / "sft")))
    assert len(scored) == 8 and all(r["prompt"].endswith("<|im_start|>assistant\n") for r in scored)


def test_real_hh_sample_as_conversational_runs_every_stage(hh_sample, tiny, tmp_path):
    """Real dialogues (multi-turn, long) in TRL's conversational form: the same pairs as the raw file."""
    raw = tmp_path / "raw"
    raw.mkdir()
    with gzip.open(hh_sample, "rt") if hh_sample.name.endswith(".gz") else open(hh_sample) as f:
        lines = [next(f) for _ in range(300)]
    (raw / "x.jsonl").write_text("".join(lines))
    folder = convert(raw, tmp_path / "data", "conversational", {"train": slice(0, 200), "test": slice(200, 300)})
    shutil.copy(raw / "x.jsonl", raw / "train.jsonl")  # the raw twin: same rows, same split
    (raw / "train.jsonl").write_text("".join(lines[:200]))
    (raw / "test.jsonl").write_text("".join(lines[200:]))
    raw_splits = data.load_splits(data.DataArguments(dataset_name=str(raw), test_offset=20))
    conv_splits = data.load_splits(data.DataArguments(dataset_name=str(folder), test_offset=20))
    assert (
        conv_splits.train["chosen"] == raw_splits.train["chosen"]
        and conv_splits.test["prompt"] == raw_splits.test["prompt"]
    )
    got = pipeline(folder, tiny["base"], tmp_path / "run", test_offset=20)
    assert got["score"]["scored"] + got["score"]["bad_rows"] == 100
