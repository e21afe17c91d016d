"""`make real`'s measurements beside the recipes' own: baselines, the best-of-K judgement and the report.

Used by ``scripts/real.py``. Every figure is read from the stages' files or computed here on exactly the pairs
and samples those stages used; features of the frozen model the RM starts from are cached under ``<out>/probe``.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM
from trl import ModelConfig, TrlParser

from hhrm import data, modeling, probe, reporting
from hhrm.rm import stage as rm

EXAMPLES = 4


def _features(load: Callable[[], Any], tokenizer, texts: list[str], cache: Path, what: str) -> np.ndarray:
    """EOS features of ``texts`` from the frozen model ``load()`` gives (called only when the cache in ``cache``
    misses: recomputed if the texts differ)."""
    key = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    if cache.is_file():
        stored = np.load(cache)
        if str(stored["key"]) == key:
            return stored["features"]
    print(f"    features of {len(texts)} {what} texts from the frozen starting model ...", flush=True)
    model = load()
    features = np.concatenate(
        [probe.eos_features(model, tokenizer, texts[i : i + 256]) for i in range(0, len(texts), 256)]
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, features=features, key=key)
    return features


def _causal_lm(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _response_tokens(tokenizer, responses: list[str]) -> np.ndarray:
    """Response lengths as :func:`hhrm.rm.evaluation.evaluate_pairs` counts them (no special tokens)."""
    return np.array([len(x) for x in tokenizer(responses, add_special_tokens=False)["input_ids"]])


def loss_curve(run_dir: Path) -> list[dict[str, float]]:
    """The training loss per logged step, read from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(run_dir.glob("runs/**/events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags().get("scalars", []):
            points |= {e.step: e.value for e in acc.Scalars("train/loss")}
    return [{"step": s, "loss": round(v, 4)} for s, v in sorted(points.items())]


def baselines(rm_args: list[str], start: Path, probe_dir: Path) -> dict[str, Any]:
    """Length rules, the untrained head and a linear probe beside the trained RM, on the RM's own test pairs."""
    data_args, args, model_args = TrlParser((data.DataArguments, rm.RewardConfig, ModelConfig)).parse_args_and_config(
        rm_args
    )
    rm_dir = Path(args.output_dir)
    tokenizer = modeling.load_tokenizer(ModelConfig(model_name_or_path=str(start)))  # as the RM recipe loads it
    pairs = rm.prepare_pairs(data.load_splits(data_args, tokenizer), tokenizer, args.max_length, args.dedup_test)
    metrics = reporting.read_json(rm_dir / "metrics.json")
    held = reporting.read_json(rm_dir / "eval_rm.json")["held_out"]["rewards"]
    rc, rr = np.array(held["chosen"]), np.array(held["rejected"])
    if len(rc) != len(pairs.test):
        raise SystemExit(f"{rm_dir}/eval_rm.json has {len(rc)} held-out pairs, the RM config gives {len(pairs.test)}")

    def texts(ds, side):
        return [p + r for p, r in zip(ds["prompt"], ds[side])]

    # The RM recipe's own untrained model (same seed, same loader), loaded once: its backbone gives the probe's
    # features and its head, reading exactly those features, the untrained RM's rewards (tests/test_probe.py proves
    # the read), so neither needs another pass over the test pairs.
    untrained = functools.cache(lambda: rm.load_reward_model(model_args, args, tokenizer).eval())
    feats = {}
    for split, ds in (("train", pairs.train), ("test", pairs.test)):
        both = _features(
            untrained, tokenizer, texts(ds, "chosen") + texts(ds, "rejected"), probe_dir / f"{split}.npz", split
        )
        feats[split] = (both[: len(ds)], both[len(ds) :])
    chosen_train, rejected_train = feats["train"]
    picked = probe.pick_l2(chosen_train, rejected_train)
    linear = probe.LinearProbe(picked["l2"]).fit(chosen_train, rejected_train)
    np.savez(probe_dir / "probe.npz", weight=linear.weight, scale=linear.scale, l2=linear.l2)
    pc, pr = linear.reward(feats["test"][0]), linear.reward(feats["test"][1])
    head = untrained().score.weight.detach().double().numpy()[0]
    uc, ur = feats["test"][0] @ head, feats["test"][1] @ head

    len_c = _response_tokens(tokenizer, list(pairs.test["chosen"]))
    len_r = _response_tokens(tokenizer, list(pairs.test["rejected"]))
    right = {"reward_model": rc > rr, "probe": pc > pr, "untrained_head": uc > ur, **probe.length_rules(len_c, len_r)}
    table = {name: probe.accuracy(ok) for name, ok in right.items()}
    beats = {
        name: probe.paired_difference(right["reward_model"], ok)
        for name, ok in right.items()
        if name != "reward_model"
    }
    lengths = np.concatenate([len_c, len_r])
    return {
        "pairs": {"train": len(pairs.train), "test": len(pairs.test), **pairs.counts},
        "accuracy": table,
        "reward_model_minus": beats,
        "reward_length_pearson": {
            "reward_model": metrics.get("eval_reward_length_pearson"),
            "probe": float(np.corrcoef(np.concatenate([pc, pr]), lengths)[0, 1]),
        },
        "data_chosen_longer_rate": metrics.get("eval_data_chosen_longer_rate"),
        "probe": {
            "features": "final hidden state at the appended EOS of the frozen model the RM starts from",
            **picked,
        },
        "loss_curve": loss_curve(rm_dir),
    }


def best_of_k(samples: Path, start: Path, probe_dir: Path) -> dict[str, Any]:
    """The RM's best-of-K pick against a random sample (the first draw) on held-out prompts."""
    rows = reporting.read_jsonl(samples)
    tokenizer = modeling.load_tokenizer(ModelConfig(model_name_or_path=str(start)))
    k = len(rows[0]["responses"])
    texts = [r["prompt"] + s for r in rows for s in r["responses"]]
    saved = np.load(probe_dir / "probe.npz")
    linear = probe.LinearProbe(float(saved["l2"]))
    linear.weight, linear.scale = saved["weight"], saved["scale"]
    judge = linear.reward(
        _features(lambda: _causal_lm(start), tokenizer, texts, probe_dir / "bestofk.npz", "sampled")
    ).reshape(-1, k)
    proxy = np.array([r["proxy"] for r in rows])
    tokens = _response_tokens(tokenizer, [s for r in rows for s in r["responses"]]).reshape(-1, k)
    pick = proxy.argmax(axis=1)  # ties: the earlier draw, as overopt counts them
    at = np.arange(len(rows))
    moved = pick != 0
    examples = []
    for i in np.flatnonzero(moved)[:EXAMPLES]:
        r = rows[i]
        examples.append(
            {
                "prompt_end": r["prompt"][-400:],
                "pick": r["responses"][pick[i]],
                "pick_reward": proxy[i, pick[i]],
                "random": r["responses"][0],
                "random_reward": proxy[i, 0],
                "probe_prefers_pick": bool(judge[i, pick[i]] > judge[i, 0]),
            }
        )
    agree = judge[at, pick][moved] > judge[at, 0][moved]
    return {
        "prompts": len(rows),
        "k": k,
        "pick_differs_from_random": int(moved.sum()),
        "rm_reward": {"pick": float(proxy[at, pick].mean()), "random": float(proxy[:, 0].mean())},
        "rm_reward_pick_minus_random": probe.paired_difference(proxy[at, pick], proxy[:, 0]),
        "probe_reward_pick_minus_random": probe.paired_difference(judge[at, pick], judge[:, 0]),
        "probe_prefers_pick": probe.accuracy(agree) if moved.any() else None,
        "response_tokens": {"pick": float(tokens[at, pick].mean()), "random": float(tokens[:, 0].mean())},
        "pick_longer_than_random": probe.accuracy((tokens[at, pick] > tokens[:, 0])[tokens[at, pick] != tokens[:, 0]]),
        "examples": examples,
    }


def assemble(out, split, base, policy, baselines, bestofk, seconds, total, threads) -> dict[str, Any]:
    rm_metrics = reporting.read_json(out / "rm" / "metrics.json")
    raft = reporting.read_json(out / "raft" / "metrics.json")
    acc = baselines["accuracy"]
    best_other = max(("longer_wins", "shorter_wins", "probe"), key=lambda k: acc[k]["accuracy"])
    margin = acc["reward_model"]["accuracy"] - acc[best_other]["accuracy"]
    return {
        "machine": f"{platform.machine()}, {threads} CPU threads, fp32",
        "base": str(base),
        "policy": str(policy),
        "split": split,
        "rm": {
            "train_pairs": rm_metrics.get("train_pairs"),
            "train_seconds": rm_metrics.get("train_runtime"),
            "eval_bt_loss": rm_metrics.get("eval_bt_loss"),
            "eval_margin_mean": rm_metrics.get("eval_margin_mean"),
            "longer_preferred_rate": rm_metrics.get("eval_longer_preferred_rate"),
        },
        "baselines": baselines,
        "goal": {
            "asked": "held-out accuracy at least 0.05 above both length rules and the probe",
            "strongest_baseline": best_other,
            "margin": margin,
            "met": bool(margin >= 0.05),
        },
        "best_of_k": bestofk,
        "raft": {
            k: raft.get(k)
            for k in (
                "prompts_per_iteration",
                "num_samples",
                "reward_first_sample_first",
                "reward_best_of_k_first",
                "heldout_reward_first",
                "heldout_reward_last",
                "seconds_generate_total",
                "seconds_score_total",
                "seconds_train_total",
            )
        },
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_minutes": round(total / 60, 1),
    }


def _ci(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['accuracy']:.3f} [{low:.3f}, {high:.3f}]"


def _diff(entry: dict, digits: int = 3) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def markdown(result: dict[str, Any]) -> str:
    b, k, raft = result["baselines"], result["best_of_k"], result["raft"]
    acc, minus = b["accuracy"], b["reward_model_minus"]
    names = {
        "reward_model": "reward model (fine-tuned, 1 epoch)",
        "probe": "logistic probe on frozen features",
        "untrained_head": "untrained head",
        "longer_wins": "longer response wins",
        "shorter_wins": "shorter response wins",
    }
    rows = [
        {
            "scorer": label,
            "held-out accuracy [95% CI]": _ci(acc[name]),
            "RM minus this, paired [95% CI]": _diff(minus[name]) if name in minus else "",
        }
        for name, label in names.items()
        if name in acc
    ]
    lines = [
        f"# Real model: {Path(result['base']).name} on real HH text",
        "",
        f"Split: {result['split']['rule']} ({result['split']['source_rows']} rows). "
        f"Pairs: {b['pairs']['train']} train, {b['pairs']['test']} held out (pairs over "
        f"{b['pairs']['max_pair_tokens']} tokens dropped: {b['pairs']['pairs_dropped_long']} train, "
        f"{b['pairs']['eval_pairs_dropped_long']} held out). "
        f"{result['machine']}; {result['total_minutes']} min in all (the stages' own times, below).",
        "",
        reporting.markdown_table(rows, list(rows[0])),
        "",
        f"Goal (accuracy >= 0.05 above the length rules and the probe): margin over the strongest, "
        f"{result['goal']['strongest_baseline']}, is {result['goal']['margin']:+.3f}: "
        f"{'met' if result['goal']['met'] else 'NOT met'}.",
        f"Reward-length correlation (Pearson, held-out responses): "
        f"RM {b['reward_length_pearson']['reward_model']:.3f}, "
        f"probe {b['reward_length_pearson']['probe']:.3f}; the chosen response is the longer one in "
        f"{b['data_chosen_longer_rate']:.3f} of held-out pairs.",
        "",
        f"## Best-of-{k['k']} on {k['prompts']} held-out prompts",
        "",
        f"- RM reward of its pick {k['rm_reward']['pick']:.3f} vs a random sample {k['rm_reward']['random']:.3f} "
        f"(paired difference {_diff(k['rm_reward_pick_minus_random'])}).",
        f"- Second opinion, the probe (not trained by the RM): pick minus random "
        f"{_diff(k['probe_reward_pick_minus_random'])}"
        + (
            f"; it prefers the RM's pick in {_ci(k['probe_prefers_pick'])} of the "
            f"{k['pick_differs_from_random']} prompts where the pick is not the random sample."
            if k["probe_prefers_pick"]
            else "."
        ),
        f"- Length: the pick has {k['response_tokens']['pick']:.1f} tokens on average, a random sample "
        f"{k['response_tokens']['random']:.1f}; where their lengths differ, the pick is the longer in "
        f"{_ci(k['pick_longer_than_random'])} of prompts.",
        f"- One RAFT iteration ({raft['prompts_per_iteration']} RM-train prompts x {raft['num_samples']}, trained on "
        f"the picks): reward of the first sample {raft['reward_first_sample_first']:.3f}, of the pick "
        f"{raft['reward_best_of_k_first']:.3f}; held-out policy reward {raft['heldout_reward_first']:.3f} before, "
        f"{raft['heldout_reward_last']:.3f} after.",
        "",
        "### Examples (the prompt's end, the RM's pick, a random sample)",
    ]
    for ex in k["examples"]:
        lines += [
            "",
            "```text",
            f"...{ex['prompt_end']}",
            f"[pick, reward {ex['pick_reward']:.2f}]{ex['pick']}",
            f"[random, reward {ex['random_reward']:.2f}]{ex['random']}",
            "```",
            f"(probe prefers the pick: {'yes' if ex['probe_prefers_pick'] else 'no'})",
        ]
    curve = b["loss_curve"]
    if curve:
        shown = curve[:: max(1, len(curve) // 10)]
        lines += ["", "RM training loss: " + ", ".join(f"step {p['step']}: {p['loss']:.3f}" for p in shown)]
    lines += ["", "Stage minutes: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in result["seconds"].items()), ""]
    return "\n".join(lines)
