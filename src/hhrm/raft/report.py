"""RAFT's numbers, from the run folder alone: per-iteration and held-out metrics, the table, the curve, the card.

Nothing here loads a model: every function reads what the stages wrote, so a report can be rebuilt
(or tested) from a run folder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hhrm.raft.alarm as alarm
from hhrm import reporting, synthetic
from hhrm.raft.config import STAGES
from hhrm.raft.files import iter_dir
from hhrm.raft.select import distinct_n, selection_rule
from hhrm.reward import sources

# Headline of the whole run (metrics.json of the output folder): first vs last iteration.
HEADLINE = (
    "reward_first_sample_first",
    "reward_first_sample_last",
    "reward_best_of_k_first",
    "reward_best_of_k_last",
    "heldout_reward_first",
    "heldout_reward_last",
    "gold_accuracy_sampled_first",
    "gold_accuracy_sampled_last",
    "gold_accuracy_first",
    "gold_accuracy_last",
    "gold_accuracy_first_sample_first",
    "gold_accuracy_first_sample_last",
)
# One iteration, as logged after it.
ITERATION_HEADLINE = (
    "reward_first_sample",
    "reward_best_of_k",
    "heldout_reward",
    "gold_accuracy",
    "gold_accuracy_sampled",
    "kept",
    "disagreement_kept",
    "proxy_gap",
    "seconds_generate",
    "seconds_train",
)
TABLE_COLUMNS = (
    "iteration",
    "reward_first_sample",
    "reward_best_of_k",
    "reward_kept",
    "heldout_reward",
    "gold_accuracy",
    "gold_accuracy_sampled",
    "gold_accuracy_first_sample",
    "response_tokens_mean",
    "distinct_2",
    "kept",
    "disagreement_kept",
    "disagreement_all",
    "disagreement_heldout",
    "proxy_gap",
    "alarm",
    "reward_rejected",
    "dpo_reward_accuracy",
    "dpo_reward_margin",
    "generated_tokens_per_second",
    "seconds_generate",
    "seconds_score",
    "seconds_train",
)
TIMED_STAGES = STAGES[:-1]  # the metrics stage reports the others' times
# update=dpo's training metrics (train.stats.json), averaged over the fine-tune's logged steps.
DPO_METRICS = ("dpo_reward_accuracy", "dpo_reward_margin")


def mean(values: list[float]) -> float:
    """Mean of the values that are numbers (None and NaN left out); NaN when there are none."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(sum(values) / len(values)) if values else float("nan")


def heldout_metrics(held: list[dict[str, Any]], gold: bool) -> dict[str, Any]:
    """Reward (and gold accuracy) of one sampled and one greedy answer per held-out prompt."""
    if not held:
        return {}
    out: dict[str, Any] = {
        "heldout_reward": mean([r["sampled_reward"] for r in held]),
        "heldout_greedy_reward": mean([r["greedy_reward"] for r in held]),
    } | alarm.heldout_disagreement(held)
    if gold:
        prompts = [r["prompt"] for r in held]
        greedy = synthetic.gold_summary(prompts, [r["greedy"] for r in held])
        out["gold_accuracy"] = greedy["gold_accuracy"]
        out |= {k: v for k, v in greedy.items() if k.startswith("gold_accuracy_")}
        out["gold_accuracy_sampled"] = synthetic.gold_summary(prompts, [r["sampled"] for r in held])["gold_accuracy"]
    return out


def iteration_metrics(folder: Path, iteration: int, policy: str, gold: bool) -> dict[str, Any]:
    """One iteration's row of the table, from its folder (scored samples, kept set, stage stats)."""
    scored = reporting.read_jsonl(folder / "scored.jsonl")
    kept = reporting.read_jsonl(folder / "kept.jsonl")
    stats = {s: reporting.read_json(folder / f"{s}.stats.json") for s in TIMED_STAGES}
    everything = [x for r in scored for x in r["responses"]]
    gen_seconds = stats["generate"].get("generate_seconds") or stats["generate"].get("seconds") or float("nan")
    m: dict[str, Any] = {
        "iteration": iteration,
        "policy": policy,
        "prompts": len(scored),
        "reward_first_sample": mean([r["rewards"][0] for r in scored]),
        "reward_best_of_k": mean([max(r["rewards"]) for r in scored]),
        "reward_mean_all": mean([x for r in scored for x in r["rewards"]]),
        "reward_kept": mean([r["reward"] for r in kept]),
        "kept": len(kept),
        "response_tokens_mean": mean([n for r in scored for n in r["response_tokens"]]),
        "distinct_1": distinct_n(everything, 1),
        "distinct_2": distinct_n(everything, 2),
    }
    m |= heldout_metrics(reporting.read_jsonl(folder / "heldout_scored.jsonl"), gold)
    if gold:
        m["gold_accuracy_first_sample"] = mean([synthetic.gold_reward(r["prompt"], r["responses"][0]) for r in scored])
    m |= {f"filtered_{k}": v for k, v in stats["select"].get("filter_counts", {}).items()}
    # Prompts that gave nothing to train on, by reason (sft: no valid sample; dpo: too few valid, within margin).
    m |= {f"skipped_{k}": v for k, v in stats["select"].get("skipped", {}).items()}
    if any("rejected_reward" in r for r in kept):  # update=dpo: kept rows are pairs, "reward" is the chosen's
        m["reward_rejected"] = mean([r.get("rejected_reward") for r in kept])
    m |= {f"seconds_{s}": stats[s].get("seconds") for s in TIMED_STAGES}
    generated = stats["generate"].get("generated_tokens", 0)
    m["generated_tokens_per_second"] = generated / gen_seconds if gen_seconds else None
    m["train_loss"] = stats["train"].get("train_loss")
    m |= {k: stats["train"][k] for k in DPO_METRICS if k in stats["train"]}
    return m


def iteration_rows(run_dir: Path, num_iterations: int) -> list[dict[str, Any]]:
    """The ``metrics.json`` of every finished iteration, in order."""
    rows = [reporting.read_json(iter_dir(run_dir, i) / "metrics.json") for i in range(num_iterations)]
    return [r for r in rows if r]


def run_selection_rule(args: Any, as_stats: bool = False) -> str | dict[str, str]:
    """The kept-set rule of a run, in words (older configs lack the regularised and soft settings: plain);
    ``as_stats``: as ``{"selection_rule": ...}`` for the select stage's stats."""
    knobs = [
        getattr(args, k, d) for k, d in (("update", "sft"), ("selection_kl_beta", 0.0), ("selection_temperature", 0.0))
    ]
    rule = selection_rule(args.selection, *knobs)
    return {"selection_rule": rule} if as_stats else rule


def run_headline(rows: list[dict[str, Any]], final: dict[str, Any], args: Any, prompt_set: int, gold: bool) -> dict:
    """The run's ``metrics.json``: first vs last iteration, stage time totals."""
    first, last = rows[0], rows[-1]
    out: dict[str, Any] = {
        "iterations": len(rows),
        "update": getattr(args, "update", "sft"),
        "prompts_per_iteration": args.prompts_per_iteration,
        "num_samples": args.num_samples,
        "selection": args.selection,
        "selection_rule": run_selection_rule(args),
        "reward_first_sample_first": first["reward_first_sample"],
        "reward_first_sample_last": last["reward_first_sample"],
        "reward_best_of_k_first": first["reward_best_of_k"],
        "reward_best_of_k_last": last["reward_best_of_k"],
        "heldout_reward_first": first.get("heldout_reward"),
        "heldout_reward_last": final.get("heldout_reward"),
    }
    if gold:
        # Greedy answers and one sample per held-out prompt (at the RAFT temperature: the policy RAFT
        # optimises), then the first sample on each iteration's drawn prompts (the gold twin of
        # reward_first_sample).
        out |= {
            "gold_accuracy_first": first.get("gold_accuracy"),
            "gold_accuracy_last": final.get("gold_accuracy"),
            "gold_accuracy_sampled_first": first.get("gold_accuracy_sampled"),
            "gold_accuracy_sampled_last": final.get("gold_accuracy_sampled"),
            "gold_accuracy_first_sample_first": first.get("gold_accuracy_first_sample"),
            "gold_accuracy_first_sample_last": last.get("gold_accuracy_first_sample"),
        }
    for s in TIMED_STAGES:
        out[f"seconds_{s}_total"] = sum((r.get(f"seconds_{s}") or 0.0) for r in rows)
    out["seconds_final_eval"] = final.get("seconds_final_eval")
    out["prompt_set"] = prompt_set
    return out


def iterations_table(rows: list[dict[str, Any]], final: dict[str, Any] | None) -> str:
    """The per-iteration Markdown table (the final policy's held-out figures as the last row)."""
    columns = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
    # Skip counts vary by update kind and are mostly zero: a column only for a reason that occurred.
    skipped = sorted({k for r in rows for k, v in r.items() if k.startswith("skipped_") and v})
    at = columns.index("kept") + 1 if "kept" in columns else len(columns)
    columns[at:at] = skipped
    return reporting.markdown_table(rows + ([{"iteration": "final"} | final] if final else []), columns)


def write_run_reports(
    out: Path, rows: list[dict[str, Any]], final: dict[str, Any] | None, title: str, report_to: Sequence[str] = ()
) -> None:
    """``metrics_per_iteration.json``, ``metrics.md`` and ``reward_curve.png`` from the rows so far.

    With TensorBoard in ``report_to``, also the newest row (step = its iteration) or, once there, the final
    policy's held-out metrics (step = the number of iterations) as scalars in ``runs/raft``.
    """
    reporting.write_json({"iterations": rows, "final": final}, out / "metrics_per_iteration.json")
    reporting.write_text(iterations_table(rows, final), out / "metrics.md")
    plot_reward_curve(rows, final, out / "reward_curve.png", title=title)
    if reporting.TENSORBOARD in report_to and rows:
        if final is None:
            reporting.log_scalars(out / "runs" / "raft", rows[-1] | {"iteration": None}, rows[-1]["iteration"], "raft")
        else:
            reporting.log_scalars(out / "runs" / "raft", final, len(rows), "final")


def model_card(
    rows: list[dict[str, Any]],
    final: dict[str, Any],
    headline: dict[str, Any],
    configs: dict[str, Any],
    data: dict[str, Any],
) -> reporting.ModelCard:
    args = configs["raft"]
    dpo = getattr(args, "update", "sft") == "dpo"
    scorer = sources.address(args)
    loop = f"{len(rows)} iterations of {args.prompts_per_iteration} prompts, K={args.num_samples} samples each"
    if dpo:
        loss = ", ".join(getattr(args, "dpo_loss_type", None) or ["sigmoid"])
        summary = (
            f"Iterative DPO on the RAFT loop: {loop}, scored by `{scorer}`, trained with TRL `DPOTrainer` on "
            f"best-vs-worst-of-K pairs (beta={getattr(args, 'beta', None)}, loss {loss}; reference: each "
            "iteration's starting policy)."
        )
    else:
        summary = (
            f"Reward-ranked fine-tuning: {loop}, `{args.selection}` selection ({run_selection_rule(args)}), "
            f"scored by `{scorer}`, fine-tuned "
            "with TRL `SFTTrainer` (completion-only loss)."
        )
    summary += alarm.card_note(headline)
    return reporting.ModelCard(
        title=f"{'Iterative-DPO' if dpo else 'RAFT'} policy from {configs['model'].model_name_or_path} (hhrm)",
        summary=summary + "\n\n![reward curve](reward_curve.png)\n\n" + iterations_table(rows, final),
        metrics=headline,
        configs=configs,
        data=data,
    )


def plot_reward_curve(rows: list[dict[str, Any]], final: dict[str, Any] | None, path: Path, title: str) -> None:
    """``reward_curve.png``: the figure of :func:`reward_curve_figure`, written atomically."""
    fig = reward_curve_figure(rows, final, title)  # first: it picks matplotlib's file-only backend
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def reward_curve_figure(rows: list[dict[str, Any]], final: dict[str, Any] | None, title: str):
    """Reward per iteration (the card's figure); with gold, gold accuracy per iteration and proxy against gold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> list[Any]:  # one value per iteration, then the final policy's
        return [r.get(key) for r in rows] + ([final.get(key)] if final else [])

    gold = any("gold_accuracy" in r for r in rows)
    spread = any("disagreement_kept" in r for r in rows)  # an ensemble's signals (hhrm.raft.alarm)
    panels = (3 if gold else 1) + spread
    fig, axes = plt.subplots(1, panels, figsize=(5.3 * panels if panels > 1 else 6, 4), squeeze=False)
    ax = axes[0][0]
    its = [r["iteration"] for r in rows]
    held_x = its + ([len(rows)] if final else [])
    ax.plot(its, [r["reward_first_sample"] for r in rows], "o-", label="policy sample (train prompts)")
    ax.plot(its, [r["reward_best_of_k"] for r in rows], "s--", label="best of K")
    ax.plot(held_x, series("heldout_reward"), "^-", label="policy sample (held-out)")
    ax.set_xlabel("RAFT iteration (policy before its fine-tune)")
    ax.set_ylabel("reward")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    if gold:
        ax2 = axes[0][1]
        ax2.plot(held_x, series("gold_accuracy"), "o-", label="greedy (held-out)")
        ax2.plot(held_x, series("gold_accuracy_sampled"), "s--", label="sampled (held-out)")
        ax2.set_xlabel("RAFT iteration")
        ax2.set_ylabel("gold accuracy")
        ax2.legend(fontsize=8)
        proxy_vs_gold(axes[0][2], held_x, series)
    if spread:
        alarm.plot_signals(axes[0][-1], rows)
    fig.tight_layout()
    return fig


def proxy_vs_gold(ax, iterations: list[int], series) -> None:
    """The over-optimisation view: held-out proxy reward (x) against held-out gold accuracy (y) of the same answers,
    one point per policy joined in iteration order and labelled with its iteration. A proxy that keeps rising
    while gold stalls or falls is the reward model being exploited."""
    answers = (
        ("heldout_reward", "gold_accuracy_sampled", "o-", "sampled answer"),
        ("heldout_greedy_reward", "gold_accuracy", "s--", "greedy answer"),
    )
    for proxy_key, gold_key, style, label in answers:
        points = [(i, x, y) for i, x, y in zip(iterations, series(proxy_key), series(gold_key)) if None not in (x, y)]
        if not points:
            continue
        ax.plot([x for _, x, _ in points], [y for _, _, y in points], style, label=label)
        for i, x, y in points:
            ax.annotate(str(i), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("held-out proxy reward (RM) of those answers")
    ax.set_ylabel("held-out gold accuracy")
    ax.set_title("proxy vs gold (point label: iteration; last: final policy)", fontsize=9)
    ax.legend(fontsize=8)
