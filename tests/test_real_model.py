"""hhrm on a real pretrained model (SmolLM2-135M-Instruct, imported once per session by conftest's ``real_model``).

Its tokenizer has pad == EOS (``<|im_end|>``), the case that breaks reward models silently; the tiny test model
does not. Three things are checked on it: hhrm's scorer equals the model's own forward at the EOS, the RM recipe
trains a few steps on hand-written HH pairs into a loadable reward model, and one best-of-2 RAFT iteration with it
records the RM's own rewards and keeps the best sample of each prompt.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_process

ROOT = Path(__file__).resolve().parents[1]
EOS = "<|im_end|>"

# Hand-written pairs in Anthropic's raw HH format (whole dialogues): the test needs no data file. The first 8 are
# RM-train (RAFT draws its prompts from them), the last 4 RM-test (RAFT's held-out prompt is the first).
PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "I don't know, maybe London?"),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have six legs, like insects."),
    ("Can you suggest a healthy breakfast?", "Oatmeal with fruit and nuts is a good start.", "Just skip it."),
    ("How do I boil an egg?", "Put it in boiling water for about nine minutes, then cool it.", "Microwave it whole."),
    ("What should I do if I feel stressed?", "Take a short walk, breathe slowly, and talk to a friend.", "Nothing."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red light.", "Because it reflects the ocean."),
    ("How can I learn to code?", "Start with a beginner Python course and build small projects.", "You can't."),
    ("What is two plus two?", "Two plus two is four.", "Two plus two is five."),
    ("Any tips for sleeping better?", "Keep a regular bedtime and avoid screens before bed.", "Drink more coffee."),
    (
        "How do plants make food?",
        "Through photosynthesis, using sunlight, water and carbon dioxide.",
        "They eat soil.",
    ),
    ("What is a good way to save money?", "Set a monthly budget and put a fixed amount aside.", "Spend it all now."),
    ("How do I say hello in Spanish?", "You say 'hola'.", "You say 'bonjour'."),
]
TRAIN_PAIRS = 8


def _dialogue(prompt: str, answer: str) -> str:
    return f"\n\nHuman: {prompt}\n\nAssistant: {answer}"


def _config(stage: str) -> Path:
    """The SmolLM2 config where the repository has one, else the tiny one: every setting that matters is given."""
    real = ROOT / "recipes" / "configs" / "smollm2_135m" / f"{stage}.yaml"
    return real if real.is_file() else ROOT / "recipes" / "configs" / "tiny" / f"{stage}.yaml"


def _launch(recipe: str, config: Path, usual_seconds: float, **overrides) -> None:
    """``accelerate launch`` (one CPU process) of ``recipes/<recipe>.py`` with ``config`` and ``overrides``."""
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "accelerate_configs/cpu.yaml"]
    cmd += [f"recipes/{recipe}.py", "--config", str(config)]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # accelerate would start 2 threads on 2 cores: on a shared machine that oversubscription made RAFT's generation
    # 4-7x slower (385 s for this file against 105 s with 1 thread); a value set by the caller is kept
    env.setdefault("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    proc = run_process(cmd, usual_seconds, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def hh_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hh_pairs")
    rows = [{"chosen": _dialogue(p, c), "rejected": _dialogue(p, r)} for p, c, r in PAIRS]
    for split, part in (("train", rows[:TRAIN_PAIRS]), ("test", rows[TRAIN_PAIRS:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


@pytest.fixture(scope="module")
def real_rm(real_model, hh_data, tmp_path_factory) -> Path:
    """A reward model trained from the real model by the RM recipe, 3 steps of 2 pairs (shared by two tests)."""
    out = tmp_path_factory.mktemp("real_rm") / "rm"
    _launch(
        "rm",
        _config("rm"),
        60,
        model_name_or_path=real_model["out"],
        dataset_name=hh_data,
        dataset_format="raw",
        test_offset=0,
        output_dir=out,
        max_steps=3,
        per_device_train_batch_size=2,
        global_batch_size=2,
        per_device_eval_batch_size=4,
        reward_batch_size=4,
        learning_rate=2e-5,
        eval_before_training="true",
        eval_strategy="no",
        gold_prompts=0,
        logging_steps=1,
        report_to="none",
        disable_tqdm="true",
        seed=0,
    )
    return out


# --------------------------------------------------------------------------------------------
# 1. The scorer with pad == EOS


@pytest.mark.slow
def test_scorer_on_the_real_model_equals_its_own_forward_at_the_eos(real_model, tmp_path):
    """hhrm swaps the pad token (pad == EOS here) and pads batches on the right; each reward must still be the
    model's own score of the unpadded ``text + EOS`` read at that EOS, the last token."""
    from transformers import AutoTokenizer
    from trl import ModelConfig

    from hhrm import modeling
    from hhrm.reward import scoring
    from hhrm.rm import stage as rm

    raw = AutoTokenizer.from_pretrained(real_model["out"])
    assert raw.pad_token == raw.eos_token == EOS  # the case under test
    model_args = ModelConfig(model_name_or_path=str(real_model["out"]))
    tok = modeling.load_tokenizer(model_args)
    assert tok.eos_token == EOS and tok.pad_token == tok.unk_token == "<|endoftext|>"  # the distinct pad hhrm picks
    args = rm.RewardConfig(output_dir=str(tmp_path / "unused"), use_cpu=True, report_to="none")
    model = rm.load_reward_model(model_args, args, tok).eval()
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id

    texts = [
        _dialogue("Hi", "Hello!"),
        _dialogue("What is the capital of France?", "Paris is the capital of France."),
        _dialogue("Tell me a joke.", "Why did the chicken cross the road? To get to the other side."),
        _dialogue("Is <|endoftext|> a pad token?", "Here it is: <|endoftext|>, inside the text."),  # pad inside
        _dialogue("Write a long answer.", " ".join(["This sentence makes the answer longer."] * 12)),
    ]
    scorer = scoring.RewardScorer(model, tok, batch_size=8)
    ids = scoring.encode(tok, texts)
    batches = list(scorer._batches(sorted(range(len(ids)), key=lambda i: len(ids[i])), ids))
    assert any(len({len(ids[i]) for i in b}) > 1 for b in batches), batches  # some rows really are padded
    rewards = scorer.score(texts)

    for text, reward in zip(texts, rewards):
        single = torch.tensor([tok(text + EOS)["input_ids"]])  # the rule, independently: text + EOS, no padding
        assert single[0, -1].item() == tok.eos_token_id
        with torch.no_grad():
            hidden = model.model(input_ids=single).last_hidden_state
            at_eos = model.score(hidden[0, -1]).item()
            before_eos = model.score(hidden[0, -2]).item()
            pooled = model(input_ids=single).logits[0, 0].item()
        assert reward == pytest.approx(at_eos, abs=1e-5) and pooled == pytest.approx(at_eos, abs=1e-5)
        # pad left == EOS would read the token before the EOS: a different number, so the test would see it
        assert abs(at_eos - before_eos) > 1e-3


# --------------------------------------------------------------------------------------------
# 2. The RM recipe on the real model


@pytest.mark.slow
def test_rm_recipe_trains_the_real_model_into_a_loadable_reward_model(real_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    metrics = json.loads((real_rm / "metrics.json").read_text())
    assert math.isfinite(metrics["train_loss"]) and metrics["train_pairs"] == TRAIN_PAIRS
    assert metrics["eval_pairs"] == len(PAIRS) - TRAIN_PAIRS
    for key in ("eval_accuracy_exact", "eval_accuracy_exact_before"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert math.isfinite(metrics["eval_bt_loss"])

    model = AutoModelForSequenceClassification.from_pretrained(real_rm)
    tok = AutoTokenizer.from_pretrained(real_rm)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id and tok.eos_token == EOS
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000


# --------------------------------------------------------------------------------------------
# 3. One best-of-2 RAFT iteration: the real model as the policy, the RM above


@pytest.mark.slow
def test_raft_iteration_with_the_real_model_keeps_the_best_of_two_by_the_rms_own_rewards(
    real_model, real_rm, hh_data, tmp_path
):
    from transformers import AutoModelForCausalLM

    from hhrm.reward import scoring

    out = tmp_path / "raft"
    _launch(
        "raft",
        _config("raft"),
        90,
        model_name_or_path=real_model["out"],
        reward_model_name_or_path=real_rm,
        dataset_name=hh_data,
        dataset_format="raw",
        test_offset=0,
        output_dir=out,
        num_iterations=1,
        prompts_per_iteration=4,
        num_samples=2,
        selection="best_of_k",
        max_new_tokens=16,
        temperature=0.7,
        heldout_prompts=1,
        generation_batch_size=4,
        reward_batch_size=4,
        filter_min_tokens=0,  # junk filters off: every prompt keeps exactly its best sample
        filter_max_repeat_fraction=1.0,
        per_device_train_batch_size=4,
        max_length=256,
        offload_models="false",
        report_to="none",
        progress="false",
        disable_tqdm="true",
        seed=0,
    )
    it = out / "iter_000"
    scored = [json.loads(line) for line in (it / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 4 and len({r["index"] for r in scored}) == 4
    assert all(len(r["responses"]) == 2 and len(r["rewards"]) == 2 for r in scored)
    assert all(math.isfinite(x) for r in scored for x in r["rewards"])

    scorer = scoring.RewardScorer.from_pretrained(real_rm, device="cpu", dtype=torch.float32)
    prompts = [r["prompt"] for r in scored for _ in range(2)]
    again = scorer.score_pairs(prompts, [x for r in scored for x in r["responses"]])
    assert again == pytest.approx([x for r in scored for x in r["rewards"]], abs=1e-4)

    kept = {r["index"]: r for r in map(json.loads, (it / "kept.jsonl").read_text().splitlines())}
    assert sorted(kept) == sorted(r["index"] for r in scored)
    for r in scored:
        best = max(range(2), key=lambda j: (r["rewards"][j], -j))  # ties: the lower sample, as hhrm picks
        k = kept[r["index"]]
        assert k["sample"] == best and k["completion"] == r["responses"][best] and k["prompt"] == r["prompt"]
        assert k["reward"] == pytest.approx(max(r["rewards"]), abs=0)

    for folder in (it / "policy", out):  # the iteration's policy and the final one linked into output_dir
        policy = AutoModelForCausalLM.from_pretrained(folder)
        assert type(policy).__name__ == "LlamaForCausalLM"
        assert all(torch.isfinite(p).all() for p in policy.parameters())
