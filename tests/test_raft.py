"""The RAFT loop end to end on tiny models: reward rises, resume is exact, 2 processes share the prompts."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from hhrm import data as hdata
from hhrm.raft import RaftConfig, StopRequested
from hhrm.reporting import read_jsonl

from conftest import QUIET_CPU, load_recipe, run_process, tensorboard_scalars, two_process_launch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TEST_OFFSET = 100
QUIET_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory) -> dict[str, Path]:
    """A briefly fine-tuned tiny policy and a tiny reward model trained from it (about a minute on CPU)."""
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    out = tmp_path_factory.mktemp("raft_models")
    splits = hdata.load_splits(hdata.DataArguments(dataset_name=str(tiny["data"]), test_offset=TEST_OFFSET))
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    common = QUIET_CPU | dict(logging_steps=50, seed=0)
    sft = SFTTrainer(
        model=str(tiny["base"]),
        train_dataset=splits.sft_texts(),
        processing_class=tok,
        args=SFTConfig(
            output_dir=str(out / "sft"),
            max_steps=60,
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            max_length=128,
            packing=True,
            packing_strategy="wrapped",
            **common,
        ),
    )
    sft.train()
    sft.save_model(str(out / "sft"))
    tok.save_pretrained(out / "sft")
    pairs = splits.train.map(
        lambda r: {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]},
        remove_columns=["prompt"],
    )
    rm = RewardTrainer(
        model=str(out / "sft"),
        train_dataset=pairs,
        processing_class=tok,
        args=RewardConfig(
            output_dir=str(out / "rm"),
            max_steps=80,
            per_device_train_batch_size=16,
            learning_rate=1e-3,
            max_length=256,
            **common,
        ),
    )
    rm.train()
    rm.save_model(str(out / "rm"))
    tok.save_pretrained(out / "rm")
    return {"policy": out / "sft", "rm": out / "rm", "data": tiny["data"]}


def settings(models: dict[str, Path], output_dir: Path, **overrides) -> dict:
    values = dict(
        model_name_or_path=str(models["policy"]),
        reward_model_name_or_path=str(models["rm"]),
        dataset_name=str(models["data"]),
        test_offset=TEST_OFFSET,
        output_dir=str(output_dir),
        num_iterations=2,
        prompts_per_iteration=32,
        num_samples=4,
        max_new_tokens=16,
        heldout_prompts=24,
        generation_batch_size=32,
        reward_batch_size=64,
        max_length=128,
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=5e-4,
        logging_steps=50,
        seed=0,
        progress=False,
        disable_tqdm=True,
        offload_models="false",
    )
    values.update(overrides)
    return values


def run(values: dict):
    """Parse as recipes/raft.py parses its command line, then call the recipe's main in this process."""
    from trl import ModelConfig, TrlParser

    argv = [x for k, v in values.items() for x in (f"--{k}", str(v))]
    configs = TrlParser((hdata.DataArguments, RaftConfig, ModelConfig)).parse_args_and_config(argv)
    return load_recipe("raft").main(*configs)


def kept(output_dir: Path, it: int) -> list[dict]:
    return read_jsonl(output_dir / f"iter_{it:03d}" / "kept.jsonl")


@pytest.fixture(scope="module")
def uninterrupted(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raft_a")
    run(settings(models, out))
    return out


def test_reward_rises_and_outputs_are_written(uninterrupted):
    out = uninterrupted
    rows = json.loads((out / "metrics_per_iteration.json").read_text())
    its, final = rows["iterations"], rows["final"]
    assert [r["iteration"] for r in its] == [0, 1]
    assert its[1]["reward_first_sample"] > its[0]["reward_first_sample"]
    # And on held-out prompts, for the sampling policy RAFT optimises (seeded, so deterministic).
    assert final["heldout_reward"] > its[0]["heldout_reward"]
    head = json.loads((out / "metrics.json").read_text())
    assert head["reward_first_sample_last"] == its[1]["reward_first_sample"]
    assert "gold_accuracy_first" in head and "gold_accuracy_last" in head
    for name in ("README.md", "reward_curve.png", "metrics.md", "config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    d = out / "iter_000"
    for name in ("prompts.jsonl", "samples.jsonl", "scored.jsonl", "kept.jsonl", "metrics.json", "policy/config.json"):
        assert (d / name).is_file(), name
    scored = read_jsonl(d / "scored.jsonl")
    assert len(scored) == 32 and all(len(r["responses"]) == len(r["rewards"]) == 4 for r in scored)
    m = its[0]
    for key in (
        "reward_best_of_k",
        "distinct_1",
        "distinct_2",
        "response_tokens_mean",
        "filtered_empty",
        "seconds_generate",
        "seconds_score",
        "seconds_train",
        "generated_tokens_per_second",
        "gold_accuracy",
    ):
        assert key in m, key
    assert m["reward_best_of_k"] >= m["reward_first_sample"]


def test_tensorboard_has_each_iteration_and_each_fine_tune(uninterrupted):
    """report_to's default: RAFT's per-iteration metrics (step = iteration) and each iteration's SFT curves."""
    out = uninterrupted
    rows = json.loads((out / "metrics_per_iteration.json").read_text())["iterations"]
    raft = tensorboard_scalars(out / "runs" / "raft")
    for key in ("reward_best_of_k", "gold_accuracy", "kept", "response_tokens_mean", "distinct_2", "seconds_train"):
        assert raft[f"raft/{key}"] == [(i, pytest.approx(r[key])) for i, r in enumerate(rows)], key
    final = json.loads((out / "metrics_per_iteration.json").read_text())["final"]
    assert raft["final/heldout_reward"] == [(2, pytest.approx(final["heldout_reward"]))]
    for it in (0, 1):
        assert "train/train_loss" in tensorboard_scalars(out / "runs" / f"iter_{it:03d}")
    assert not list((out / "iter_000" / "policy").rglob("events.out.tfevents.*"))  # not inside the model folder


def test_scoring_through_a_reward_server_resumes_and_matches_in_process(models, uninterrupted, tmp_path):
    """reward_model_url: a server that goes away fails the run naming the URL; the re-run against the model
    served again (at another port) resumes at the scoring stage and ends with the in-process run's numbers."""
    from bench.servers import launch

    out = tmp_path / "remote"
    served = {k: v for k, v in settings(models, out).items() if k != "reward_model_name_or_path"}
    with launch(models["rm"], "--num_threads", "1") as url:
        with pytest.raises(StopRequested):
            run(served | {"reward_model_url": url, "stop_after": "0:generate"})
    with pytest.raises(ConnectionError, match=f"reward_model_url='{url}'.*make serve-rm"):
        run(served | {"reward_model_url": url, "reward_request_retries": 0})
    samples = (out / "iter_000" / "samples.jsonl").read_text()
    with launch(models["rm"], "--num_threads", "1") as other_url:
        assert other_url != url
        run(served | {"reward_model_url": other_url})
    assert (out / "iter_000" / "samples.jsonl").read_text() == samples  # nothing generated again
    remote = json.loads((out / "metrics_per_iteration.json").read_text())
    local = json.loads((uninterrupted / "metrics_per_iteration.json").read_text())
    for mine, theirs in zip(remote["iterations"] + [remote["final"]], local["iterations"] + [local["final"]]):
        for key in ("reward_best_of_k", "reward_kept", "heldout_reward", "gold_accuracy", "gold_accuracy_sampled"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], abs=1e-4), key
        assert mine.get("kept") == theirs.get("kept")
    assert kept(out, 1) == kept(uninterrupted, 1)


def test_resume_after_interruption_in_each_stage_gives_identical_results(models, uninterrupted, tmp_path):
    out = tmp_path / "raft_b"
    for stop in ("0:generate", "0:train", "1:draw", "1:generate", "1:score", "1:select", "1:train", "1:metrics"):
        with pytest.raises(StopRequested):
            run(settings(models, out, stop_after=stop))
        if stop == "1:select":
            # a kill in the middle of training: a half-written policy folder and a stray temp file
            (out / "iter_001" / "policy.tmp").mkdir()
            (out / "iter_001" / "policy.tmp" / "model.safetensors").write_bytes(b"garbage")
            (out / "iter_001" / "kept.jsonl.tmp").write_text("{broken")
    run(settings(models, out))
    for it in (0, 1):
        assert kept(out, it) == kept(uninterrupted, it)
        assert read_jsonl(out / f"iter_{it:03d}" / "scored.jsonl") == read_jsonl(
            uninterrupted / f"iter_{it:03d}" / "scored.jsonl"
        )
    a = json.loads((uninterrupted / "metrics_per_iteration.json").read_text())["final"]
    b = json.loads((out / "metrics_per_iteration.json").read_text())["final"]
    assert a["heldout_reward"] == b["heldout_reward"]


def test_bad_settings_fail_early_naming_the_setting(models, tmp_path):
    with pytest.raises(ValueError, match="num_samples"):
        run(settings(models, tmp_path, num_samples=0))
    with pytest.raises(ValueError, match="prompts_per_iteration"):
        run(settings(models, tmp_path, prompts_per_iteration=10**6))
    with pytest.raises(ValueError, match="selection"):  # a config object (YAML values are not checked by argparse)
        RaftConfig(output_dir=str(tmp_path), selection="best_of_n")
    with pytest.raises(SystemExit):  # on the command line argparse names the setting and its choices, exit 2
        run(settings(models, tmp_path, selection="best_of_n"))
    with pytest.raises(ValueError, match="stop_after"):
        run(settings(models, tmp_path, stop_after="zero:draw"))


def test_two_processes_cover_every_prompt_once(models, tmp_path):
    out = tmp_path / "raft_ddp"
    values = settings(models, out, num_iterations=1, prompts_per_iteration=21, heldout_prompts=9)
    argv = [x for k, v in values.items() for x in (f"--{k}", str(v))]
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = two_process_launch("recipes/raft.py", *argv)
    proc = run_process(cmd, 90, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = out / "iter_000"
    drawn = [r["index"] for r in read_jsonl(d / "prompts.jsonl")]
    samples = read_jsonl(d / "samples.jsonl")
    assert len(drawn) == len(set(drawn)) == 21
    assert [r["index"] for r in samples] == drawn  # every drawn prompt exactly once, in order
    assert {r["rank"] for r in samples} == {0, 1}  # and both processes generated
    assert sorted(r["index"] for r in read_jsonl(d / "scored.jsonl")) == sorted(drawn)
    assert len(read_jsonl(d / "kept.jsonl")) <= 21
    held = read_jsonl(d / "heldout_scored.jsonl")
    assert [r["position"] for r in held] == list(range(9))
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()


def test_resume_with_other_settings_is_refused(models, uninterrupted):
    with pytest.raises(ValueError, match="other settings.*num_samples"):
        run(settings(models, uninterrupted, num_samples=3))


# ----- update=dpo: iterative DPO on the same loop

DPO = dict(update="dpo", learning_rate=1e-4, beta=0.1)


@pytest.fixture(scope="module")
def dpo_run(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dpo_a")
    run(settings(models, out, **DPO))
    return out


def test_dpo_trains_on_each_prompts_best_and_worst_sample(dpo_run):
    """Per prompt the best and the worst scored sample; every prompt paired or counted as skipped."""
    out = dpo_run
    for it in (0, 1):
        d = out / f"iter_{it:03d}"
        scored = {r["index"]: r for r in read_jsonl(d / "scored.jsonl")}
        pairs = read_jsonl(d / "kept.jsonl")
        stats = json.loads((d / "select.stats.json").read_text())
        junk = {(r["index"], r["sample"]) for r in read_jsonl(d / "filtered.jsonl")}
        assert pairs and len(pairs) + sum(stats["skipped"].values()) == len(scored) == 32
        for p in pairs:
            s = scored[p["index"]]
            assert p["prompt"] == s["prompt"]
            assert (p["chosen"], p["reward"]) == (s["responses"][p["chosen_sample"]], s["rewards"][p["chosen_sample"]])
            assert (p["rejected"], p["rejected_reward"]) == (
                s["responses"][p["rejected_sample"]],
                s["rewards"][p["rejected_sample"]],
            )
            valid = [r for j, r in enumerate(s["rewards"]) if (p["index"], j) not in junk]  # junk is never paired
            assert p["reward"] == max(valid) and p["rejected_reward"] == min(valid) < p["reward"]
        train = json.loads((d / "train.stats.json").read_text())
        assert 0.0 <= train["dpo_reward_accuracy"] <= 1.0 and math.isfinite(train["dpo_reward_margin"])
    rows = json.loads((out / "metrics_per_iteration.json").read_text())
    assert [r["iteration"] for r in rows["iterations"]] == [0, 1] and "gold_accuracy" in rows["final"]
    for name in ("README.md", "reward_curve.png", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name


def test_dpo_moves_the_policy(models, dpo_run):
    from safetensors.torch import load_file

    start = load_file(models["policy"] / "model.safetensors")
    trained = load_file(dpo_run / "iter_000" / "policy" / "model.safetensors")
    assert start.keys() == trained.keys()
    assert any(not (start[k] == trained[k]).all() for k in start)


def test_dpo_reference_is_the_iterations_starting_policy(models, dpo_run, tmp_path):
    """With the reference loaded from the policy's folder (precompute off) DPO trains as with the policy's own
    log-probs before its first step: both references are the iteration's starting policy, in iteration 1 too
    (where the resident policy was trained in iteration 0 and still names the SFT folder as its origin)."""
    out = tmp_path / "dpo_ref"
    run(settings(models, out, **DPO, precompute_ref_log_probs="false"))
    for it in (0, 1):
        a = json.loads((dpo_run / f"iter_{it:03d}" / "train.stats.json").read_text())
        b = json.loads((out / f"iter_{it:03d}" / "train.stats.json").read_text())
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4, abs=1e-5), it
        assert kept(out, it) == kept(dpo_run, it)


def test_dpo_resumes_after_interruption_in_each_stage(models, dpo_run, tmp_path):
    out = tmp_path / "dpo_b"
    for stop in ("0:score", "0:train", "1:generate", "1:select", "1:train", "1:metrics"):
        with pytest.raises(StopRequested):
            run(settings(models, out, **DPO, stop_after=stop))
        if stop == "1:select":  # a kill in the middle of training
            (out / "iter_001" / "policy.tmp").mkdir()
            (out / "iter_001" / "policy.tmp" / "model.safetensors").write_bytes(b"garbage")
    run(settings(models, out, **DPO))
    for it in (0, 1):
        assert kept(out, it) == kept(dpo_run, it)
    a = json.loads((dpo_run / "metrics_per_iteration.json").read_text())["final"]
    b = json.loads((out / "metrics_per_iteration.json").read_text())["final"]
    assert a["heldout_reward"] == b["heldout_reward"]


def test_dpo_bad_settings_fail_when_parsed_naming_the_setting(tmp_path):
    base = dict(output_dir=str(tmp_path), reward_model_name_or_path="rm", update="dpo")
    for bad, match in (
        (dict(num_samples=1), "num_samples=1 with update=dpo"),
        (dict(beta=0.0), "beta=0.0"),
        (dict(beta=-0.5), "beta=-0.5"),
        (dict(dpo_loss_type="sigmoidal"), "dpo_loss_type"),
        (dict(pair_margin=-1.0), "pair_margin"),
        (dict(selection="top_fraction"), "selection='top_fraction' with update=dpo"),
        (dict(update="ppo"), "update='ppo'"),
    ):
        with pytest.raises(ValueError, match=match):
            RaftConfig(**(base | bad))
    assert RaftConfig(**base, dpo_loss_type="ipo").dpo_loss_type == ["ipo"]


def test_an_iteration_with_nothing_to_train_on_says_so_and_stops(models, tmp_path):
    """No pair past the margin: the run stops after scoring with the counts and the settings to change, writes no
    empty training set, and says so again when re-run; all-junk samples stop the recipe with one line, exit 2."""
    from hhrm.raft.config import NothingToTrain

    out = tmp_path / "margin"
    values = settings(models, out, **DPO, num_iterations=1, prompts_per_iteration=8, heldout_prompts=4)
    for _ in range(2):
        with pytest.raises(NothingToTrain, match=r"iteration 0: nothing to train on.*within_margin': 8.*pair_margin"):
            run(values | {"pair_margin": 1e9})
    assert (out / "iter_000" / "scored.jsonl").is_file() and not (out / "iter_000" / "kept.jsonl").exists()
    junk = values | {"output_dir": str(tmp_path / "junk"), "filter_patterns": "."}
    argv = [x for k, v in junk.items() for x in (f"--{k}", str(v))]
    proc = run_process([sys.executable, "recipes/raft.py", *argv], 60, cwd=ROOT, env=os.environ | QUIET_ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hhrm: error: iteration 0: nothing to train on") and "too_few_valid': 8" in last, last
    assert "filter_patterns" in last


def test_dpo_under_two_processes(models, tmp_path):
    out = tmp_path / "dpo_ddp"
    values = settings(models, out, **DPO, num_iterations=1, prompts_per_iteration=21, heldout_prompts=9)
    argv = [x for k, v in values.items() for x in (f"--{k}", str(v))]
    proc = run_process(two_process_launch("recipes/raft.py", *argv), 90, cwd=ROOT, env=os.environ | QUIET_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = out / "iter_000"
    assert {r["rank"] for r in read_jsonl(d / "samples.jsonl")} == {0, 1}
    stats = json.loads((d / "select.stats.json").read_text())
    assert len(read_jsonl(d / "kept.jsonl")) + sum(stats["skipped"].values()) == 21
    assert "dpo_reward_accuracy" in json.loads((d / "train.stats.json").read_text())
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()


def test_regularised_soft_selection_keeps_the_rules_pick_from_the_policys_logprobs(models, tmp_path):
    """selection_kl_beta > 0: the generate stage records each sample's log pi(y|x) under the iteration's policy (as
    hhrm.logprobs computes it), and the select stage keeps, per prompt, the soft regularised rule's draw from
    reward + beta * log pi; a resume with another beta is refused. Stops after select (no fine-tune)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM
    from trl import ModelConfig

    from hhrm import logprobs, modeling
    from hhrm.raft.select import regularised_scores, select_best_of_k

    out = tmp_path / "rbon"
    values = settings(models, out, num_iterations=1, prompts_per_iteration=8, heldout_prompts=2, max_new_tokens=12)
    values |= dict(selection_kl_beta=0.1, selection_temperature=0.5, stop_after="0:select")
    with pytest.raises(StopRequested):
        run(values)
    d = out / "iter_000"
    scored = read_jsonl(d / "scored.jsonl")
    tok = modeling.load_tokenizer(ModelConfig(model_name_or_path=str(models["policy"])))
    policy = AutoModelForCausalLM.from_pretrained(models["policy"])
    modeling.match_vocab(policy, tok)
    prompts = [r["prompt"] for r in scored for _ in r["responses"]]
    responses = [x for r in scored for x in r["responses"]]
    eos = [n < 12 for r in scored for n in r["response_tokens"]]
    expected = logprobs.sequence_logprobs(policy, tok, prompts, responses, 1.0, eos=eos)
    assert [x for r in scored for x in r["response_logprobs"]] == pytest.approx(expected, abs=1e-4)
    reasons = [[None] * 4 for _ in scored]
    for f in read_jsonl(d / "filtered.jsonl"):
        reasons[[r["index"] for r in scored].index(f["index"])][f["sample"]] = f["reason"]
    scores = regularised_scores([r["rewards"] for r in scored], [r["response_logprobs"] for r in scored], 0.1)
    seed = RaftConfig.seed_for(SimpleNamespace(seed=0), 0, 4, 0)
    picks = select_best_of_k(scores, reasons, temperature=0.5, seed=seed)
    assert [(r["index"], r["sample"]) for r in kept(out, 0)] == [(scored[i]["index"], j) for i, j in picks]
    assert [r["selection_score"] for r in kept(out, 0)] == pytest.approx([scores[i][j] for i, j in picks])
    rule = json.loads((d / "select.stats.json").read_text())["selection_rule"]
    assert "softmax((reward + 0.1 * log pi(y|x)" in rule and "/ 0.5" in rule
    with pytest.raises(ValueError, match="other settings.*raft.selection_kl_beta"):
        run(values | {"selection_kl_beta": 0.3})
