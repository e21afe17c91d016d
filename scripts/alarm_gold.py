"""Does RAFT's over-optimisation alarm fire before gold falls? Measured on the embedded default, with the weak RM's
5-seed ensemble of scripts/ensemble_overopt.py as the proxy and an update that over-optimises it.

    python scripts/alarm_gold.py [--policy outputs/tiny/sft] [--members outputs/tiny/ensemble/rm_weak_s{0..4}]

One `recipes/raft.py` run (one process) from recipes/configs/tiny/raft_dpo.yaml with the ensemble (rule mean) in
place of the RM, ``stop_on_alarm`` off so gold is seen after the alarm too, and the alarm's settings; then, from its
metrics_per_iteration.json, per iteration the held-out gold accuracy (sampled: the policy the loop optimises; greedy),
the proxy (held-out sampled reward; kept-set reward), the disagreement (kept, all, held-out), the proxy gap, and
where the alarm fired (also where it would fire at other thresholds: the rule of hhrm.raft.alarm on the same rows).
Missing models are built into --work by the repository's recipes (SFT: recipes/configs/tiny/sft.yaml; each member:
the RM recipe for 1 epoch with seed s, as scripts/ensemble_overopt.py says). Writes results/ensemble/alarm.{json,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from hhrm import reporting
from hhrm.raft.alarm import rise

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.0, 0.1, 0.25, 0.5)
GAP_THRESHOLDS = (0.05, 0.1, 0.25, 0.5)


def recipe(name: str, config: str, *extra: str) -> None:
    cmd = [sys.executable, f"recipes/{name}.py", "--config", config, "--report_to", "none", *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def ensure_models(args) -> tuple[str, list[str]]:
    """The policy and the members, built into --work by the recipes when a given folder is missing."""
    work = Path(args.work)
    policy = args.policy
    if not (Path(policy) / "config.json").is_file():
        policy = str(work / "sft")
        if not (Path(policy) / "config.json").is_file():
            recipe("sft", "recipes/configs/tiny/sft.yaml", "--output_dir", policy)
    members = []
    for s, m in enumerate(args.members):
        if not (Path(m) / "config.json").is_file():
            m = str(work / f"rm_weak_s{s}")
            if not (Path(m) / "config.json").is_file():
                recipe("rm", "recipes/configs/tiny/rm.yaml", "--model_name_or_path", policy, "--num_train_epochs",
                       "1", "--seed", str(s), "--output_dir", m)  # fmt: skip
        members.append(m)
    return policy, members


def run_raft(args, policy: str, members: list[str]) -> Path:
    name = "raft_dpo" if args.update == "dpo" else "raft"
    config = yaml.safe_load((ROOT / f"recipes/configs/tiny/{name}.yaml").read_text())
    config.pop("reward_model_name_or_path")
    out = Path(args.work) / f"raft_{args.update}"
    config |= {
        "model_name_or_path": policy, "reward_ensemble": members, "reward_aggregation": "mean",
        "output_dir": str(out), "num_iterations": args.iterations, "prompts_per_iteration": args.prompts,
        "heldout_prompts": args.heldout, "learning_rate": args.learning_rate, "seed": args.seed,
        "overopt_alarm_disagreement": args.alarm, "overopt_alarm_gap": args.gap_alarm, "stop_on_alarm": False,
        "report_to": "none", "progress": False,
    }  # fmt: skip
    path = Path(args.work) / f"raft_{args.update}_alarm.yaml"
    path.write_text(yaml.safe_dump(config))
    recipe("raft", str(path))  # a rerun resumes (the loop's stages are resumable)
    return out


def first_at(rows: list[dict], key: str, threshold: float, relative: bool) -> int | None:
    """The first iteration >= 1 at which ``key`` rose by more than ``threshold`` over iteration 0's."""
    base = rows[0].get(key)
    for r in rows[1:]:
        up = rise(r.get(key), base) if relative else (r.get(key) - base if None not in (r.get(key), base) else None)
        if up is not None and up > threshold:
            return r["iteration"]
    return None


def gap_se(out: Path, it: int) -> dict:
    """The proxy gap's sampling noise: the standard error of a difference of two independent means."""
    d = out / f"iter_{it:03d}"
    kept = np.array([r["reward"] for r in reporting.read_jsonl(d / "kept.jsonl")])
    held = np.array([r["sampled_reward"] for r in reporting.read_jsonl(d / "heldout_scored.jsonl")])
    return {"proxy_gap_se": float(np.sqrt(kept.var(ddof=1) / len(kept) + held.var(ddof=1) / len(held)))}


def summarise(args, out: Path, members: list[str], policy: str) -> dict:
    report = reporting.read_json(out / "metrics_per_iteration.json")
    rows, final = report["iterations"], report["final"]
    keys = ("gold_accuracy_sampled", "gold_accuracy", "heldout_reward", "reward_kept", "disagreement_kept",
            "disagreement_all", "disagreement_heldout", "proxy_gap", "proxy_gap_rise", "disagreement_kept_rise",
            "alarm")  # fmt: skip
    table = [{"iteration": r["iteration"]} | {k: r.get(k) for k in keys} | gap_se(out, r["iteration"]) for r in rows]
    table.append({"iteration": "final"} | {k: final.get(k) for k in keys})
    gold = [r.get("gold_accuracy_sampled") for r in table]
    peak = max(range(len(gold)), key=lambda i: gold[i])
    falls = next((i for i in range(peak + 1, len(gold)) if gold[i] < gold[peak] - args.gold_drop), None)
    return {
        "policy": policy, "members": members, "update": args.update, "learning_rate": args.learning_rate,
        "seed": args.seed, "iterations": args.iterations, "prompts_per_iteration": args.prompts,
        "heldout_prompts": args.heldout, "overopt_alarm_disagreement": args.alarm, "overopt_alarm_gap": args.gap_alarm,
        "rows": table,
        "alarm_fired_at": next((r["iteration"] for r in rows if r.get("alarm")), None),
        "gold_peak_policy": peak, "gold_drop": args.gold_drop,
        "gold_falls_at_policy": falls,  # policy index (the "final" row is policy len(rows))
        "would_fire_at": {f"disagreement +{t:.0%}": first_at(rows, "disagreement_kept", t, True) for t in THRESHOLDS}
        | {f"gap +{t}": first_at(rows, "proxy_gap", t, False) for t in GAP_THRESHOLDS},
    }  # fmt: skip


def markdown(s: dict) -> str:
    cols = ["iteration", "gold_accuracy_sampled", "gold_accuracy", "heldout_reward", "reward_kept",
            "disagreement_kept", "disagreement_all", "disagreement_heldout", "proxy_gap", "proxy_gap_se",
            "alarm"]  # fmt: skip
    fired = s["alarm_fired_at"]
    lines = [
        f"## update={s['update']}, lr {s['learning_rate']}",
        "",
        f"recipes/configs/tiny/{'raft_dpo' if s['update'] == 'dpo' else 'raft'}.yaml (lr {s['learning_rate']}, seed "
        f"{s['seed']}, {s['iterations']} iterations x {s['prompts_per_iteration']} prompts x K=8, "
        f"{s['heldout_prompts']} held-out prompts) with the 5-member ensemble of 1-epoch RMs (rule mean) as the "
        f"proxy: {', '.join(f'`{m}`' for m in s['members'])}; policy `{s['policy']}`. Alarm: "
        f"overopt_alarm_disagreement={s['overopt_alarm_disagreement']}, overopt_alarm_gap={s['overopt_alarm_gap']}, "
        "stop_on_alarm off (to see gold after it).",
        "",
        "Row i is policy i (the one iteration i samples from; `final`: the last update's policy). Gold: held-out gold "
        "accuracy of one sampled answer per prompt (the policy the loop optimises) and of the greedy answer. Proxy: "
        "`heldout_reward` (the ensemble's reward of the sampled held-out answers) and `reward_kept` (of the chosen "
        "samples). Disagreement: mean member std. `proxy_gap` = reward_kept - heldout_reward; `proxy_gap_se`: its "
        "standard error (of a difference of two means).",
        "",
        reporting.markdown_table(s["rows"], cols),
        f"- Alarm fired first at iteration: **{fired}** (at the thresholds above; would fire at other thresholds: "
        + ", ".join(f"{k}: {v}" for k, v in s["would_fire_at"].items())
        + ").",
        f"- Gold (sampled) peaks at policy {s['gold_peak_policy']} and first falls more than {s['gold_drop']} below "
        f"that peak at policy {s['gold_falls_at_policy']}.",
        *reading(s),
    ]
    return "\n".join(lines) + "\n"


def reading(s: dict) -> list[str]:
    """What the rows say about each signal, computed (not hand-written), so a rerun with other numbers stays true."""
    rows = [r for r in s["rows"] if r["iteration"] != "final"]
    rises = [r["disagreement_kept_rise"] for r in rows[1:] if r.get("disagreement_kept_rise") is not None]
    gaps = [r["proxy_gap_rise"] for r in rows[1:] if r.get("proxy_gap_rise") is not None]
    out = [f"- Kept disagreement rise per iteration: {', '.join(f'{x:+.2%}' for x in rises)}."]
    if rises and max(rises) <= 0:
        out.append(
            "- Disagreement: the kept samples' member std never rose above iteration 0's: the disagreement alarm "
            "fires at no threshold >= 0. The "
            "members agree more, not less, as the policy drifts: they share the blind spot it finds (results/ensemble/"
            "ensemble.md: seed-only ensembles disagree little on wrong answers)."
        )
    if gaps:
        out.append(f"- Proxy gap rise per iteration: {', '.join(f'{x:+.3f}' for x in gaps)} (reward units).")
    return out


# Written from the numbers of the runs below (2026-12-07, seed 1, this script's defaults); rerun: check it still holds.
CONCLUSION = """## Answer: no, not before gold falls (and not reliably at all) on this setup

Both updates over-optimise the weak RM's ensemble: the held-out proxy rises every iteration while held-out sampled
gold falls (DPO: 0.83 -> 0.80 -> 0.62 -> 0.46 -> 0.41 -> 0.37; RAFT: 0.83 -> 0.85 -> 0.78 -> 0.72 -> 0.65).

- **Disagreement does not rise.** The kept samples' member std falls under DPO (-2% to -5% against iteration 0)
  and stays flat under RAFT (-1.3% to +0.01%); the held-out answers' std falls in both (1.235 -> ~1.19). The
  disagreement alarm never fires under DPO at any threshold >= 0; under RAFT only a threshold of 0 fires, at
  iteration 2 by +0.01% (noise), when gold has already fallen. The five members (one recipe, five seeds) share the
  blind spot the policy moves into, as `ensemble.md` found for best-of-n: the signal Coste et al. rely on is absent.
- **The proxy gap follows the update, not over-optimisation.** Under DPO it widens while gold falls (0.09 -> 0.14 ->
  0.21 -> 0.25, then 0.15; standard error ~0.06 each); under RAFT it narrows while gold falls too (0.07 -> 0.02 ->
  -0.04 -> -0.03). DPO's chosen samples pull away from the policy's typical answer; RAFT's fine-tune pulls the
  typical answer up to the kept set. A gap alarm at 0.05 would have stopped the DPO run at iteration 1 and kept
  policy 1 (sampled gold 0.80 instead of 0.37), but that first rise (+0.056) is within one standard error of a rise
  (~0.08), and the same alarm never fires on the RAFT run, which over-optimised as well.

So the alarm is built and recorded per iteration, and on the embedded default it is not an early warning: keep
`stop_on_alarm` for ensembles whose members differ more than by seed (bootstrapped pairs, the multi-head RM,
other pretraining), where it remains to be measured. One seed per update; 500 held-out prompts (binomial standard
error of gold ~0.02). The policy is the SFT recipe rebuilt (recipes/configs/tiny/sft.yaml, gold 0.945, as the
README's), the members are the 1-epoch RMs of `ensemble.md` (trained from the original outputs/tiny/sft, same
recipe).
"""


def plot(summaries: list[dict], path: Path) -> None:
    """Gold, proxy gap and kept disagreement per policy, one line per run: does a signal turn before gold does?"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("gold_accuracy_sampled", "held-out gold (sampled)"), ("proxy_gap", "proxy_gap (+- 1 se)"),
              ("disagreement_kept", "disagreement_kept (member std)"))  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for s in summaries:
        rows = [r for r in s["rows"] if r.get("proxy_gap") is not None]
        its = [r["iteration"] for r in rows]
        label = f"{s['update']} lr {s['learning_rate']}"
        for ax, (key, title) in zip(axes, panels):
            y = np.array([r[key] for r in rows], dtype=float)
            ax.plot(its, y, "o-", label=label)
            if key == "proxy_gap":
                se = np.array([r["proxy_gap_se"] for r in rows])
                ax.fill_between(its, y - se, y + se, alpha=0.15)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("policy (RAFT iteration)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", default="outputs/tiny/sft")
    p.add_argument("--members", nargs="+", default=[f"outputs/tiny/ensemble/rm_weak_s{s}" for s in range(5)])
    p.add_argument("--work", default="outputs/tiny/ensemble/alarm")
    p.add_argument("--runs", nargs="+", default=["dpo:2e-5:5", "sft:2e-5:4"], help="update:learning_rate:iterations")
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--alarm", type=float, default=0.25, help="overopt_alarm_disagreement")
    p.add_argument("--gap_alarm", type=float, default=0.5, help="overopt_alarm_gap")
    p.add_argument("--gold_drop", type=float, default=0.03, help="a fall of gold: this far below its peak")
    p.add_argument("--out", default="results/ensemble")
    args = p.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    policy, members = ensure_models(args)
    summaries = []
    for spec in args.runs:
        update, lr, iterations = spec.split(":")
        run = argparse.Namespace(**vars(args), update=update, learning_rate=float(lr), iterations=int(iterations))
        summaries.append(summarise(run, run_raft(run, policy, members), members, policy))
    title = "# Does RAFT's over-optimisation alarm fire before gold falls? (weak-RM ensemble, embedded default)\n\n"
    text = title + "`python scripts/alarm_gold.py` (hhrm.raft.alarm's signals)\n\n" + CONCLUSION + "\n"
    text += "\n".join(map(markdown, summaries))
    reporting.write_json({"runs": summaries}, Path(args.out) / "alarm.json")
    plot(summaries, Path(args.out) / "alarm.png")
    text += "\n![gold, proxy gap and disagreement per policy](alarm.png)\n"
    reporting.write_text(text, Path(args.out) / "alarm.md")
    print(text)


if __name__ == "__main__":
    main()
