"""Honest evaluation of a reward model: held-out pair metrics, and agreement with the gold reward on fresh samples.

The metrics only; ``recipes/eval_rm.py`` (``make eval-rm``) evaluates any reward model folder with
them, and the RM recipe runs them after training.

Headline numbers are computed here, not taken from ``RewardTrainer``: its logged accuracy is a mean
of per-batch means. Accuracy is exact over pairs, and a tie (equal rewards) counts as wrong.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from hhrm import data as hdata
from hhrm import reporting, synthetic
from hhrm.reward import conventions, scoring

logger = logging.getLogger(__name__)

CARD_BEGIN = "<!-- hhrm.rm.evaluation: begin -->"
CARD_END = "<!-- hhrm.rm.evaluation: end -->"


# --------------------------------------------------------------------------------------------
# Statistics


def bt_loss(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """Per-pair Bradley-Terry loss ``-log sigmoid(r_c - r_r)``, stable for large margins."""
    return np.logaddexp(0.0, -(np.asarray(chosen, float) - np.asarray(rejected, float)))


def exact_accuracy(chosen: np.ndarray, rejected: np.ndarray) -> float:
    """Share of pairs with ``r_c > r_r`` strictly: a tie is wrong (a constant RM scores 0, not 0.5)."""
    if len(chosen) == 0:
        return float("nan")
    return float(np.mean(np.asarray(chosen) > np.asarray(rejected)))


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks (0-based) with ties given their average rank."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), float)
    r[order] = np.arange(len(x), dtype=float)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r)
    return (sums / counts)[inverse]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(ranks(x), ranks(y))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (Mann-Whitney; a tied pos/neg pair counts half)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels) > 0.5
    pos, neg = scores[labels], np.sort(scores[~labels])
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    below = np.searchsorted(neg, pos, side="left")
    equal = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * equal).sum() / (len(pos) * len(neg)))


def quantile_edges(values: np.ndarray, n: int) -> list[int]:
    """``n`` buckets' integer edges from the quantiles of ``values`` (duplicates merged)."""
    qs = np.quantile(np.asarray(values, float), np.linspace(0, 1, n + 1))
    edges = sorted({int(math.floor(qs[0]))} | {int(math.ceil(q)) for q in qs[1:]})
    return edges if len(edges) > 1 else [edges[0], edges[0]]


# --------------------------------------------------------------------------------------------
# Held-out pairs


def pair_ids(tokenizer, ds: Dataset) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of prompt+chosen and prompt+rejected (:func:`scoring.encode`), reused if the pairs carry them."""
    if "chosen_ids" in ds.column_names:
        return list(ds["chosen_ids"]), list(ds["rejected_ids"])
    return (
        scoring.encode(tokenizer, [p + c for p, c in zip(ds["prompt"], ds["chosen"])]),
        scoring.encode(tokenizer, [p + r for p, r in zip(ds["prompt"], ds["rejected"])]),
    )


def pair_rewards(
    scorer: scoring.RewardScorer, chosen_ids: list[list[int]], rejected_ids: list[list[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Rewards of the encoded chosen and rejected texts."""
    rewards = np.array(scorer.score_ids(chosen_ids + rejected_ids))
    return rewards[: len(chosen_ids)], rewards[len(chosen_ids) :]


def scored_pairs(scorer: scoring.RewardScorer, ds: Dataset) -> tuple[list, list, np.ndarray, np.ndarray]:
    """``(chosen ids, rejected ids, chosen rewards, rejected rewards)`` under the scorer's convention: hhrm's scores
    the ids the RM recipe trained on (:func:`pair_ids`); another tool's rule, which may need the prompt apart (a chat
    template, a text pair), scores (prompt, chosen) and (prompt, rejected) through ``score_pairs``."""
    convention = getattr(scorer, "convention", conventions.HHRM)
    if convention == conventions.HHRM:
        chosen_ids, rejected_ids = pair_ids(scorer.tokenizer, ds)
        return chosen_ids, rejected_ids, *pair_rewards(scorer, chosen_ids, rejected_ids)
    prompts, chosen, rejected = list(ds["prompt"]), list(ds["chosen"]), list(ds["rejected"])
    rewards = np.array(scorer.score_pairs(prompts + prompts, chosen + rejected))
    return (
        conventions.encode(scorer.tokenizer, prompts, chosen, convention),
        conventions.encode(scorer.tokenizer, prompts, rejected, convention),
        rewards[: len(prompts)],
        rewards[len(prompts) :],
    )


def scored_heads(scorer: scoring.RewardScorer, ds: Dataset) -> tuple[list, list, np.ndarray, np.ndarray, dict]:
    """:func:`scored_pairs` of a multi-head RM (hhrm's convention): rewards are the heads' mean (the ensemble's
    default rule), and each head's exact accuracy (``accuracy_exact_head_<e>``) comes from the same forward."""
    chosen_ids, rejected_ids = pair_ids(scorer.tokenizer, ds)
    table = np.asarray(scorer.score_ids_heads(chosen_ids + rejected_ids), dtype=np.float64)
    hc, hr = table[: len(chosen_ids)], table[len(chosen_ids) :]
    per_head = {f"accuracy_exact_head_{e}": exact_accuracy(hc[:, e], hr[:, e]) for e in range(table.shape[1])}
    return chosen_ids, rejected_ids, hc.mean(axis=1), hr.mean(axis=1), per_head


def evaluate_pairs(
    scorer: scoring.RewardScorer, ds: Dataset, n_buckets: int = 4, prefix: str = "eval_"
) -> tuple[dict[str, float], dict[str, Any]]:
    """Exact accuracy, BT loss, reward stats, accuracy by length bucket and length bias.

    Returns ``(flat metrics, details)``; details hold the bucket table and the raw rewards.
    """
    if len(ds) == 0:
        raise ValueError("no held-out pairs to evaluate (RM-test is empty after filtering)")
    tok = scorer.tokenizer
    if getattr(scorer, "heads", 1) > 1 and getattr(scorer, "convention", conventions.HHRM) == conventions.HHRM:
        chosen_ids, rejected_ids, rc, rr, per_head = scored_heads(scorer, ds)
    else:
        (chosen_ids, rejected_ids, rc, rr), per_head = scored_pairs(scorer, ds), {}
    pair_len = np.array([max(len(c), len(r)) for c, r in zip(chosen_ids, rejected_ids)])
    resp_c = np.array([len(x) for x in tok(list(ds["chosen"]), add_special_tokens=False)["input_ids"]])
    resp_r = np.array([len(x) for x in tok(list(ds["rejected"]), add_special_tokens=False)["input_ids"]])
    all_rewards = np.concatenate([rc, rr])
    m: dict[str, float] = {
        "accuracy_exact": exact_accuracy(rc, rr),
        "ties": int(np.sum(rc == rr)),
        "bt_loss": float(bt_loss(rc, rr).mean()),
        "margin_mean": float(np.mean(rc - rr)),
        "reward_mean": float(all_rewards.mean()),
        "reward_std": float(all_rewards.std()),
        "reward_chosen_mean": float(rc.mean()),
        "reward_rejected_mean": float(rr.mean()),
        # Length bias: does the reward follow response length, within the data and within a pair?
        "reward_length_pearson": pearson(all_rewards, np.concatenate([resp_c, resp_r])),
        "reward_length_spearman": spearman(all_rewards, np.concatenate([resp_c, resp_r])),
    }
    differ = resp_c != resp_r
    m["longer_preferred_rate"] = (
        float(np.mean(np.where(resp_c > resp_r, rc > rr, rr > rc)[differ])) if differ.any() else float("nan")
    )
    m |= per_head  # a multi-head RM: accuracy_exact is the heads' mean's; each head's too
    m["data_chosen_longer_rate"] = float(np.mean((resp_c > resp_r)[differ])) if differ.any() else float("nan")
    edges = quantile_edges(pair_len, n_buckets)
    buckets = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        inside = (pair_len >= lo) & ((pair_len <= hi) if i == len(edges) - 2 else (pair_len < hi))
        name = f"{lo}-{hi}" if i == len(edges) - 2 else f"{lo}-{hi - 1}"
        acc = exact_accuracy(rc[inside], rr[inside])
        buckets.append({"tokens": name, "pairs": int(inside.sum()), "accuracy_exact": acc})
        m[f"accuracy_len_{name}"] = acc
    metrics = {f"{prefix}{k}": v for k, v in m.items()}
    details = {
        "length_buckets": buckets,
        "length_bucket_edges": edges,
        "rewards": {"chosen": rc.tolist(), "rejected": rr.tolist()},
    }
    return metrics, details


# --------------------------------------------------------------------------------------------
# Gold agreement on fresh responses (embedded data only)


def gold_agreement_stats(
    prompts: list[str], responses: list[list[str]], rewards: list[list[float]]
) -> dict[str, float]:
    """How well RM scores of sampled responses track the gold reward (1 correct / 0 wrong).

    * ``gold_auc``: AUC of the RM score for correct vs wrong responses, over all samples;
    * ``gold_pairwise_agreement``: among same-prompt pairs whose gold differs, the share the RM orders
      the correct one strictly higher (ties wrong, like the held-out accuracy);
    * ``gold_best_of_k_accuracy`` vs ``gold_sample_accuracy``: gold accuracy of the RM's pick among
      the K samples (what RAFT keeps) vs of a random sample; ``gold_oracle_best_of_k``: any correct.
    """
    gold = [[synthetic.gold_reward(p, r) for r in rs] for p, rs in zip(prompts, responses)]
    flat_gold = np.array([g for gs in gold for g in gs])
    flat_rm = np.array([s for ss in rewards for s in ss])
    agree = pairs = 0
    best, oracle = [], []
    for gs, ss in zip(gold, rewards):
        for i in range(len(gs)):
            for j in range(len(gs)):
                if gs[i] > gs[j]:
                    pairs += 1
                    agree += ss[i] > ss[j]
        best.append(gs[int(np.argmax(ss))])
        oracle.append(max(gs))
    return {
        "gold_auc": auc(flat_rm, flat_gold),
        "gold_pairwise_agreement": agree / pairs if pairs else float("nan"),
        "gold_pairs": pairs,
        "gold_samples": len(flat_gold),
        "gold_sample_accuracy": float(flat_gold.mean()) if len(flat_gold) else float("nan"),
        "gold_best_of_k_accuracy": float(np.mean(best)) if best else float("nan"),
        "gold_oracle_best_of_k": float(np.mean(oracle)) if oracle else float("nan"),
        "gold_reward_correct_mean": float(flat_rm[flat_gold > 0.5].mean())
        if (flat_gold > 0.5).any()
        else float("nan"),
        "gold_reward_wrong_mean": float(flat_rm[flat_gold < 0.5].mean()) if (flat_gold < 0.5).any() else float("nan"),
    }


def accuracy_by_task(test: Dataset, chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """Embedded data: exact accuracy per task family, and on refusals vs wrong-but-well-formed rejections."""
    groups: dict[str, list[bool]] = {}
    for p, r, c_reward, r_reward in zip(test["prompt"], test["rejected"], chosen, rejected):
        kind = "refusal" if r.strip() in synthetic.REFUSALS else "wrong_answer"
        for key in (f"eval_accuracy_task_{synthetic.task_name(p)}", f"eval_accuracy_rejected_{kind}"):
            groups.setdefault(key, []).append(bool(c_reward > r_reward))
    return {k: float(np.mean(v)) for k, v in sorted(groups.items())}


def gold_agreement(
    scorer: scoring.RewardScorer,
    policy_path: str | Path,
    prompts: list[str],
    k: int,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Sample ``k`` responses per prompt from the policy at ``policy_path``; compare RM scores with gold."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hhrm import generation

    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    policy.to(next(scorer.model.parameters()).device)
    torch.manual_seed(seed)
    sampling = generation.SamplingArguments(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature)
    responses = generation.generate_responses(policy, tokenizer, prompts, k, sampling, batch_size=64)
    flat = scorer.score_pairs(
        [p for p, rs in zip(prompts, responses) for _ in rs], [r for rs in responses for r in rs]
    )
    rewards, pos = [], 0
    for rs in responses:
        rewards.append(flat[pos : pos + len(rs)])
        pos += len(rs)
    stats = gold_agreement_stats(prompts, responses, rewards)
    examples = [
        {"prompt": p, "response": r, "rm": s, "gold": synthetic.gold_reward(p, r)}
        for p, rs, ss in list(zip(prompts, responses, rewards))[:5]
        for r, s in zip(rs, ss)
    ]
    return {"metrics": stats | {"gold_prompts": len(prompts)}, "examples": examples}


# --------------------------------------------------------------------------------------------
# Everything, as the recipe and the CLI run it


def evaluate(
    scorer: scoring.RewardScorer,
    test: Dataset,
    args: Any,
    policy_path: str | Path | None = None,
    train_prompts: set[str] | None = None,
) -> dict[str, Any]:
    """Held-out pair metrics, plus gold agreement when the data is the embedded set and a policy is given."""
    metrics, details = evaluate_pairs(scorer, test, args.length_buckets)
    result: dict[str, Any] = {"metrics": metrics, "held_out": details}
    prompts = hdata.distinct_prompts(test["prompt"], args.gold_prompts) if args.gold_prompts else []
    if synthetic.is_gold_checkable(list(test["prompt"])):
        metrics.update(
            accuracy_by_task(test, np.array(details["rewards"]["chosen"]), np.array(details["rewards"]["rejected"]))
        )
    if policy_path is not None and synthetic.is_gold_checkable(prompts):
        gold = gold_agreement(
            scorer,
            policy_path,
            prompts,
            args.gold_samples_per_prompt,
            args.gold_max_new_tokens,
            args.gold_temperature,
            args.seed,
        )
        metrics.update(gold["metrics"])
        if train_prompts is not None:
            metrics["gold_prompts_seen_in_train"] = sum(p in train_prompts for p in prompts)
        result["gold_examples"] = gold["examples"]
    return result


def write_results(result: dict[str, Any], path: str | Path) -> Path:
    return reporting.write_json(result, path)


def card_section(metrics: dict[str, Any], details: dict[str, Any], model: str) -> str:
    """The evaluation section of a reward model's card (between markers, so a re-evaluation replaces it)."""
    buckets = reporting.markdown_table(
        details["length_buckets"], ("tokens", "pairs", "accuracy_exact"), ("pair tokens", "pairs", "exact accuracy")
    )
    return "\n".join(
        [
            CARD_BEGIN,
            f"## Evaluation (`recipes/eval_rm.py`, {model})",
            "",
            reporting.metrics_table(metrics),
            "Accuracy by length bucket:",
            "",
            buckets,
            CARD_END,
            "",
        ]
    )


def update_card(folder: Path, section: str) -> Path:
    """Insert (or replace) the evaluation section of ``folder/README.md``."""
    path = folder / "README.md"
    text = path.read_text() if path.is_file() else ""
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(CARD_END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    reporting.write_text(text, path)
    return path
