"""The sampled-KL estimator (hhrm.logprobs) and the RAFT-vs-DPO comparison (hhrm.compare, recipes/compare.py)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from hhrm import compare, logprobs, reporting
from hhrm.generation import SamplingArguments, generate_responses
from hhrm.reporting import read_json
from hhrm.reward import ensemble, sources

from conftest import QUICK_TEST_OFFSET, ROOT

TEST_OFFSET = QUICK_TEST_OFFSET
PROMPTS = [
    "###Human: What is 3 plus 4? ###Assistant:",
    "###Human: Hi there! ###Assistant: Hello! How can I help you today? "
    "###Human: Which number is larger, 12 or 40? ###Assistant:",
    "###Human: How many words are in this list: apple river? ###Assistant:",
]
ANSWERS = [" 3 plus 4 is 7.", " Of 12 and 40, the larger is 40.", " There are 2 words in the list."]


@pytest.fixture(scope="module")
def base(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    return AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32).eval(), tok


# --------------------------------------------------------------------------------------------
# Log-probabilities and the KL estimate


def test_logprobs_equal_a_hand_computed_log_softmax_sum(base):
    """Prompt tokenized alone (as generation does), the answer's tokens and EOS after it, logits / temperature."""
    model, tok = base
    temperature = 0.7
    got = logprobs.sequence_logprobs(model, tok, PROMPTS, ANSWERS, temperature, batch_size=2, eos=True)
    prompt = tok(PROMPTS[1], add_special_tokens=False)["input_ids"]
    ids = prompt + tok(ANSWERS[1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    by_hand = sum(
        torch.log_softmax(logits[t - 1] / temperature, -1)[ids[t]].item() for t in range(len(prompt), len(ids))
    )
    assert got[1] == pytest.approx(by_hand, abs=1e-4)
    # Padding and batching change nothing; EOS adds exactly its own log-probability.
    alone = logprobs.sequence_logprobs(model, tok, PROMPTS[1:2], ANSWERS[1:2], temperature, batch_size=1, eos=True)
    assert alone[0] == pytest.approx(got[1], abs=1e-4)
    no_eos = logprobs.sequence_logprobs(model, tok, PROMPTS[1:2], ANSWERS[1:2], temperature, eos=False)
    eos_logp = torch.log_softmax(logits[-2] / temperature, -1)[tok.eos_token_id].item()
    assert no_eos[0] + eos_logp == pytest.approx(got[1], abs=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        logprobs.sequence_logprobs(model, tok, PROMPTS, ANSWERS, temperature=0.0)


def test_kl_is_zero_against_itself_and_positive_against_another_model(base):
    model, tok = base
    tok.padding_side = "left"
    prompts = PROMPTS * 8
    sampling = SamplingArguments(max_new_tokens=8, temperature=1.0)
    answers = [r[0] for r in generate_responses(model, tok, prompts, 1, sampling, batch_size=8, seed=0)]
    mine = logprobs.sequence_logprobs(model, tok, prompts, answers, 1.0, batch_size=5)
    assert logprobs.kl_estimate(mine, mine) == {"kl": 0.0, "kl_se": 0.0, "samples": len(prompts)}
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theirs = logprobs.sequence_logprobs(other, tok, prompts, answers, 1.0, batch_size=7)
    kl = logprobs.kl_estimate(mine, theirs)
    assert kl["kl"] > 2 * kl["kl_se"] > 0  # clearly positive, not noise around zero


# --------------------------------------------------------------------------------------------
# The comparison's settings (no model runs)


def write_yaml(path: Path, **values) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def arm(models: dict[str, Path], **overrides) -> dict:
    values = dict(
        model_name_or_path=str(models["policy"]),
        reward_model_name_or_path=str(models["rm"]),
        dataset_name=str(models["data"]),
        test_offset=TEST_OFFSET,
        output_dir="unused",
        num_iterations=2,  # the end-to-end test overrides it to 1 for both arms
        prompts_per_iteration=12,
        num_samples=4,
        max_new_tokens=10,
        heldout_prompts=12,
        generation_batch_size=16,
        reward_batch_size=64,
        max_length=128,
        per_device_train_batch_size=8,
        learning_rate=5e-4,
        logging_steps=50,
        report_to="none",
        progress=False,
        disable_tqdm=True,
        offload_models=False,
        seed=0,
    )
    return values | overrides


PLACES = {"policy": "outputs/tiny/sft", "rm": "outputs/tiny/rm", "data": "outputs/tiny/data"}  # parsed, never loaded


def test_configs_that_differ_in_the_budget_are_refused_naming_the_settings(tiny, tmp_path):
    places = PLACES | {"policy": tiny["base"]}  # parse_arm checks the start policy: a causal LM folder
    sft = write_yaml(tmp_path / "sft.yaml", **arm(places))
    dpo = write_yaml(tmp_path / "dpo.yaml", **arm(places, update="dpo", num_samples=8, learning_rate=1e-5))
    args = compare.CompareConfig(sft_config=sft, dpo_config=dpo, output_dir=str(tmp_path / "out"))
    parsed = {u: compare.parse_arm(args, u) for u in compare.UPDATES}
    with pytest.raises(ValueError, match=r"differ in num_samples \(4 vs 8\): a fair comparison"):
        compare.check_same_budget(args, parsed)
    args.overrides = ["num_samples=6"]  # applied to both arms: now the same budget (learning rates may differ)
    shared = compare.check_same_budget(args, {u: compare.parse_arm(args, u) for u in compare.UPDATES})
    assert shared["num_samples"] == 6 and shared["test_offset"] == TEST_OFFSET
    swapped = compare.CompareConfig(sft_config=dpo, dpo_config=dpo, output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="sft_config=.* has update: dpo; the sft arm needs update: sft"):
        compare.check_same_budget(swapped, {u: compare.parse_arm(swapped, u) for u in compare.UPDATES})
    for bad, message in ((["num_samples"], "not key=value"), (["seed=3"], "seed is set by the comparison")):
        with pytest.raises(ValueError, match=message):
            compare.CompareConfig(sft_config=sft, dpo_config=dpo, overrides=bad)
    with pytest.raises(FileNotFoundError, match="dpo_config="):
        compare.CompareConfig(sft_config=sft, dpo_config=str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="seeds"):
        compare.CompareConfig(sft_config=sft, dpo_config=dpo, seeds=[1, 1])


def test_launch_commands_run_the_raft_recipe_per_update_and_seed(tmp_path):
    sft = write_yaml(tmp_path / "sft.yaml", **arm(PLACES))
    dpo = write_yaml(tmp_path / "dpo.yaml", **arm(PLACES, update="dpo"))
    args = compare.CompareConfig(
        sft_config=sft, dpo_config=dpo, output_dir="out/cmp", overrides=["num_iterations=1"], num_processes=2
    )
    cmd = compare.launch_command(args, "recipes/raft.py", "dpo", 3)
    assert cmd[1:5] == ["launch", "--quiet", "--config_file", "accelerate_configs/cpu.yaml"]
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    tail = ["recipes/raft.py", "--config", dpo, "--num_iterations", "1", "--seed", "3", "--output_dir"]
    assert cmd[-len(tail) - 1 : -1] == tail and cmd[-1] == str(Path("out/cmp") / "dpo_seed3")
    args.launcher = "python"
    assert compare.launch_command(args, "recipes/raft.py", "sft", 0)[:2] == [sys.executable, "recipes/raft.py"]


def test_a_second_arm_changes_only_the_reward_or_the_selection(tmp_path):
    sft = write_yaml(tmp_path / "sft.yaml", **arm(PLACES))
    dpo = write_yaml(tmp_path / "dpo.yaml", **arm(PLACES, update="dpo"))
    args = compare.CompareConfig(
        sft_config=sft, dpo_config=dpo, output_dir="out/cmp", updates=["sft"],
        arm_overrides=["reward_ensemble=rm_a rm_b rm_c", "reward_aggregation=worst"],
    )  # fmt: skip
    assert args.arms() == [("sft", None), ("sft", "ensemble")]
    single = compare.launch_command(args, "recipes/raft.py", "sft", 0)
    ensemble = compare.launch_command(args, "recipes/raft.py", "sft", 0, "ensemble")
    assert "--reward_ensemble" not in single and single[-1] == str(Path("out/cmp") / "sft_seed0")
    at = ensemble.index("--reward_ensemble")
    assert ensemble[at + 1 : at + 4] == ["rm_a", "rm_b", "rm_c"]  # a list setting: one argument per folder
    assert ensemble[ensemble.index("--reward_aggregation") + 1] == "worst"
    # the ensemble replaces the configs' single folder (both set would be refused by the RAFT recipe)
    assert ensemble[ensemble.index("--reward_model_name_or_path") + 1] == ""
    assert ensemble[-1] == str(Path("out/cmp") / "sft_ensemble_seed0")
    args.arm_overrides, args.second_arm = ["selection_kl_beta=0.3"], "rbon"  # a selection rule: also an arm setting
    rbon = compare.launch_command(args, "recipes/raft.py", "sft", 1, "rbon")
    assert rbon[rbon.index("--selection_kl_beta") + 1] == "0.3" and "--reward_model_name_or_path" not in rbon
    assert rbon[-1] == str(Path("out/cmp") / "sft_rbon_seed1")
    for bad, message in (
        (dict(arm_overrides=["learning_rate=1e-4"]), "'learning_rate' is not a reward-source or selection setting"),
        (dict(arm_overrides=["reward_aggregation=median"]), r"reward_aggregation='median': expected one of"),
        (dict(arm_overrides=["reward_ensemble=a"], second_arm="../x"), "second_arm='../x': letters"),
        (dict(updates=["ppo"]), r"updates=\['ppo'\]: give sft, dpo or both"),
    ):
        with pytest.raises(ValueError, match=message):
            compare.CompareConfig(sft_config=sft, dpo_config=dpo, **bad)


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = [
        {"update": "sft", "seed": s, "metrics": {"own_reward": v, "kl_to_start": None}}
        for s, v in ((0, 1.0), (1, 3.0))
    ]
    runs.append({"update": "dpo", "seed": 0, "metrics": {"own_reward": 2.0}})
    summary = compare.summarise(runs)
    assert summary["sft"]["own_reward"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2.0)), "n": 2}
    assert summary["dpo"]["own_reward"] == {"mean": 2.0, "std": None, "n": 1}
    assert summary["sft"]["kl_to_start"]["n"] == 0 and math.isnan(summary["sft"]["kl_to_start"]["mean"])
    shared = dict(
        num_iterations=1, prompts_per_iteration=4, num_samples=2, temperature=0.7, max_new_tokens=8, heldout_prompts=4,
        model_name_or_path="sft", reward_model_name_or_path="rm", reward_model_url=None,
    )  # fmt: skip
    text = compare.markdown({"summary": summary, "runs": runs, "same_budget": shared, "seeds": [0, 1]})
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 2 + 2 + 3 and len({row.count("|") for row in rows}) == 1  # no stray "|" in a cell
    assert "| sft | 2 | " in text and "| 2 ± 1.4 |" in text and "| dpo | 1 | " in text


# --------------------------------------------------------------------------------------------
# End to end: both arms, two seeds, one iteration each; a second invocation reuses the runs


@pytest.fixture(scope="module")
def models(quick_models) -> dict[str, Path]:
    return quick_models


@pytest.mark.slow
def test_compare_end_to_end_reuses_finished_runs_and_refuses_unequal_budgets(models, tmp_path):
    sft = write_yaml(tmp_path / "sft.yaml", **arm(models))
    dpo = write_yaml(tmp_path / "dpo.yaml", **arm(models, update="dpo", learning_rate=2e-4))
    out = tmp_path / "cmp"
    args = compare.CompareConfig(
        sft_config=sft, dpo_config=dpo, seeds=[0, 1], output_dir=str(out), overrides=["num_iterations=1"]
    )
    args.launcher = "python"  # one process without accelerate's start-up (launch_command's test covers accelerate)
    result = compare.run(args, ROOT / "recipes" / "raft.py")
    assert [(r["update"], r["seed"]) for r in result["runs"]] == [("sft", 0), ("dpo", 0), ("sft", 1), ("dpo", 1)]
    assert not any(r["finished_before"] for r in result["runs"])
    for r in result["runs"]:
        m = r["metrics"]
        for key in ("gold_accuracy_sampled", "gold_accuracy_greedy", "distinct_1", "distinct_2"):
            assert 0.0 <= m[key] <= 1.0, (r["update"], key)
        assert math.isfinite(m["heldout_reward"]) and math.isfinite(m["own_reward"]) and m["seconds"] > 0
        # 12 held-out answers: the estimate is noisy (its sign too); the estimator's own test checks it
        assert math.isfinite(m["kl_to_start"]) and m["kl_to_start_se"] > 0 and m["response_tokens"] > 0
        run_dir = Path(r["run_dir"])
        assert read_json(run_dir / "metrics.json")["update"] == r["update"] and (run_dir / "final").is_dir()
    dpo_kept = (out / "dpo_seed0" / "iter_000" / "kept.jsonl").read_text()
    assert '"rejected"' in dpo_kept  # the dpo arm really trained on pairs
    assert result["summary"]["dpo"]["kl_to_start"]["n"] == 2
    table = (out / compare.TABLE_FILE).read_text()
    assert "| sft | 2 |" in table and "| dpo | 2 |" in table and "±" in table
    assert read_json(out / compare.JSON_FILE)["same_budget"]["num_iterations"] == 1

    samples = out / "sft_seed1" / "iter_000" / "samples.jsonl"
    before = samples.stat().st_mtime_ns
    again = compare.run(args, ROOT / "recipes" / "raft.py")
    assert all(r["finished_before"] for r in again["runs"]) and samples.stat().st_mtime_ns == before
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in result["runs"]]

    bad = write_yaml(tmp_path / "dpo_bad.yaml", **arm(models, update="dpo", heldout_prompts=8))
    cmd = [sys.executable, str(ROOT / "recipes" / "compare.py"), "--sft_config", sft, "--dpo_config", bad]
    done = subprocess.run(cmd + ["--output_dir", str(tmp_path / "bad")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("hhrm: error: sft_config=")
    assert "heldout_prompts (12 vs 8)" in done.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_compare_runs_the_single_rm_against_its_ensemble(models, tmp_path):
    from test_ensemble import _member

    members = [str(models["rm"]), str(_member(models["rm"], tmp_path / "m1", 1))]
    sft = write_yaml(tmp_path / "sft.yaml", **arm(models))
    dpo = write_yaml(tmp_path / "dpo.yaml", **arm(models, update="dpo"))
    out = tmp_path / "cmp"
    args = compare.CompareConfig(
        sft_config=sft, dpo_config=dpo, seeds=[0], output_dir=str(out), overrides=["num_iterations=1"],
        updates=["sft"], arm_overrides=[f"reward_ensemble={' '.join(members)}", "reward_aggregation=worst"],
        launcher="python",
    )  # fmt: skip
    result = compare.run(args, ROOT / "recipes" / "raft.py")
    assert [r["arm"] for r in result["runs"]] == ["sft", "sft+ensemble"]
    single, both = (Path(r["run_dir"]) for r in result["runs"])
    # the same draws; only the rewards differ: the ensemble arm scored every sample as min over its two members
    assert (single / "iter_000" / "prompts.jsonl").read_text() == (both / "iter_000" / "prompts.jsonl").read_text()
    assert (single / "iter_000" / "samples.jsonl").read_text() == (both / "iter_000" / "samples.jsonl").read_text()
    samples = reporting.read_jsonl(both / "iter_000" / "scored.jsonl")[:2]
    prompts = [r["prompt"] for r in samples for _ in r["responses"]]
    responses = [x for r in samples for x in r["responses"]]
    alone = [sources.LocalModel(m).score_pairs(prompts, responses) for m in members]
    got = [x for r in samples for x in r["rewards"]]
    assert got == pytest.approx(ensemble.aggregate(alone, "worst").tolist(), abs=1e-4)
    assert set(result["summary"]) == {"sft", "sft+ensemble"}
    table = (out / compare.TABLE_FILE).read_text()
    assert "| sft+ensemble | 1 |" in table and "ensemble (worst) of" in table
