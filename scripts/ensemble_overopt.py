"""Reward ensembles against over-optimisation, measured on gold: `make overopt` curves of one weak RM and of its
E-member ensemble under each rule, on the same samples, collected into results/ensemble/.

    # E weak RMs: the RM recipe for 1 epoch (the README's rm_weak is seed 0), other seeds
    for s in 0 1 2 3 4; do
        make rm ARGS="--num_train_epochs 1 --seed $s --output_dir outputs/tiny/ensemble/rm_weak_s$s"
    done
    python scripts/ensemble_overopt.py            # the curves (recipes/overopt.py, one process each), then the table

Each curve is recipes/overopt.py with the same policy, prompts, n_max and seed, so every run draws the same samples
(the driver checks it) and only the proxy that picks differs: the single RM (member 0), then the ensemble under
reward_aggregation mean, worst, uwo. Each run's overopt.{json,md,png} is copied to results/ensemble/<run>/ (its
samples.jsonl stays under --work). From the ensemble's samples.jsonl, which keeps each member's reward, the other
rule settings (each member alone, uwo at other lambdas) are recomputed exactly with hhrm.overopt.curve: the same
numbers `make overopt` would give for them on these samples. Writes results/ensemble/ensemble.{json,md,png}.

Regularised best-of-n (RBoN-KL, Jinnai et al. 2024): the single-RM run also passes --kl_betas, so its samples.jsonl
records each sample's log pi(y|x) under the policy (summed over the response tokens, at the sampling temperature);
the pick argmax proxy + beta * log pi is then computed, for each beta, with the single RM and with the ensemble mean
as proxy (hhrm.overopt_curves.regularised_curves, the same samples). Writes results/ensemble/regularised.{md,png}
and the curves into ensemble.json ("regularised").
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from hhrm import overopt, reporting
from hhrm.reward import ensemble

ROOT = Path(__file__).resolve().parents[1]
LAMBDAS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
KL_BETAS = (0.05, 0.1, 0.3, 1.0, 3.0, 10.0)


def run_curve(args, name: str, reward: list[str]) -> dict:
    """One `make overopt` (recipes/overopt.py) into <work>/<name>; its report files copied to <out>/<name>."""
    work = Path(args.work) / name
    betas = [float(x) for x in reward[reward.index("--kl_betas") + 1 :]] if "--kl_betas" in reward else []
    same = reporting.read_json(work / overopt.JSON_FILE).get("kl_betas", []) == betas  # else rerun: log-probs
    if args.reuse and (work / overopt.JSON_FILE).is_file() and same:
        return reporting.read_json(work / overopt.JSON_FILE)
    cmd = [sys.executable, "recipes/overopt.py", "--model_name_or_path", args.policy, "--dataset_name", args.data,
           "--test_offset", "500", "--output_dir", str(work), "--n_max", str(args.n_max), "--heldout_prompts",
           str(args.prompts), "--seed", str(args.seed), "--overwrite_output_dir", "true", "--progress", "false",
           *reward]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    for f in (overopt.JSON_FILE, overopt.TABLE_FILE, overopt.PLOT_FILE):
        shutil.copy(work / f, out / f)
    return reporting.read_json(work / overopt.JSON_FILE)


def member_metrics(path: str) -> dict:
    m = reporting.read_json(Path(path) / "metrics.json")
    return {k: m.get(k) for k in ("eval_accuracy_exact", "gold_auc", "gold_best_of_k_accuracy")}


def recomputed(samples: list[dict]) -> dict[str, list[dict]]:
    """Curves of other rule settings on the ensemble run's own samples (exact: the same estimator, same samples)."""
    table = np.array([s["proxy_members"] for s in samples])  # [prompts, n_max, E]
    gold = np.array([s["gold"] for s in samples], dtype=np.float64)
    curves = {f"member {e}": overopt.curve(table[..., e], gold) for e in range(table.shape[-1])}
    for rule in ("mean", "worst"):
        curves[rule] = overopt.curve(ensemble.aggregate(table.transpose(2, 0, 1), rule), gold)
    for lam in LAMBDAS:
        curves[f"uwo lambda {lam}"] = overopt.curve(ensemble.aggregate(table.transpose(2, 0, 1), "uwo", lam), gold)
    return curves


def heads_rules(extra: list[str], samples: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """For an --extra proxy whose samples keep per-member rewards (a multi-head RM): its worst and uwo curves."""
    curves = {}
    for item in extra:
        name = item.partition("=")[0]
        if samples[name] and "proxy_members" in samples[name][0]:
            table = np.array([s["proxy_members"] for s in samples[name]]).transpose(2, 0, 1)
            gold = np.array([s["gold"] for s in samples[name]], dtype=np.float64)
            for rule in ("worst", "uwo"):
                curves[f"{name}, {rule}"] = overopt.curve(ensemble.aggregate(table, rule, 0.5), gold)
    return curves


def regularised(samples: dict[str, list[dict]], betas: list[float]) -> dict[str, dict[str, list[dict]]]:
    """RBoN-KL curves per proxy (the single RM, the ensemble mean) and beta, all on the same samples and log-probs."""
    single = samples["single weak RM (member 0)"]
    mean = np.array([s["proxy"] for s in samples["ensemble mean"]])
    logps = np.array([s["logprobs"] for s in single])
    gold = np.array([s["gold"] for s in single], dtype=np.float64)
    out = {
        "single weak RM (member 0)": overopt.regularised_from_samples(single, betas),
        "ensemble mean": overopt.regularised_curves(mean, logps, gold, betas),
    }
    for curves in out.values():  # beta -> infinity: the likeliest of the n samples, whatever the proxy says
        curves["inf"] = overopt.curve(logps, gold, logps, logps)
    return out


def regularised_markdown(summary: dict) -> str:
    reg = summary["regularised"]
    lp = summary["logprob_stats"]
    lines = [
        "# Regularised best-of-n (RBoN-KL) against over-optimisation (gold accuracy of the pick)",
        "",
        f"Policy `{summary['policy']}`; the same {summary['prompts']} held-out prompts x {summary['n_max']} samples "
        f"(seed {summary['seed']}) as ensemble.md. Pick: argmax proxy + beta * log pi(y|x), log pi the sample's "
        "sequence log-prob under the sampling policy (summed over response tokens, EOS included when the response "
        "stopped before max_new_tokens, temperature 1.0); -log pi(y|x) is the KL of the one-point distribution on y "
        "to the policy (Jinnai et al., 2024). beta 0 is plain best-of-n. Exact over all n-subsets; half-width: the "
        "largest 95% half-width over n; log pi (n_max): the pick's mean log pi at n = n_max; beta inf: the likeliest "
        "of the n samples.",
        "",
        f"Sample log pi: mean {lp['mean']:.1f}, std {lp['std']:.1f}, per-prompt std (mean over prompts) "
        f"{lp['within_prompt_std']:.1f}; proxy reward of the single RM: per-prompt std {lp['proxy_within_std']:.2f}.",
        "",
    ]
    single = reg["single weak RM (member 0)"]
    plain, mode = single["0"][-1]["gold_mean"], single["inf"][-1]["gold_mean"]
    lines += [
        f"Reading: at n = {summary['n_max']} the likeliest sample alone (beta inf, no RM) scores {mode:.2f} against "
        f"plain best-of-n's {plain:.2f}, and gold accuracy rises with beta throughout: on this testbed the SFT "
        "policy's likeliest answer is mostly gold-correct, so the log pi term does most of the work. The gain says "
        "the weak RM is a worse selector than the policy's own likelihood here, not that RBoN helps in general; a "
        "policy whose mode is wrong would need a beta that leaves the RM in charge.",
        "",
    ]
    for proxy, curves in reg.items():
        lines += [f"## Proxy: {proxy}", "", overopt.regularised_markdown(curves, True).split("\n\n", 2)[2]]
    return "\n".join(lines) + "\n"


def logprob_stats(samples: list[dict]) -> dict:
    """The scale of log pi beside the proxy's (what a sensible beta is): overall and within-prompt spreads."""
    logps, proxy = np.array([s["logprobs"] for s in samples]), np.array([s["proxy"] for s in samples])
    return {
        "mean": float(logps.mean()), "std": float(logps.std()), "within_prompt_std": float(logps.std(-1).mean()),
        "proxy_within_std": float(proxy.std(-1).mean()),
    }  # fmt: skip


def plot_regularised(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(summary["regularised"].items())
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (proxy, curves) in zip(axes[0], panels):
        for beta, curve in curves.items():
            x = [r["sqrt_kl"] for r in curve]
            ax.plot(x, [r["gold_mean"] for r in curve], "o-" if float(beta) == 0 else ".--", label=f"beta {beta}")
        ceiling = next(iter(curves.values()))
        ax.plot(x, [r["gold_ceiling_mean"] for r in ceiling], "k:", label="gold's own pick")
        for r in ceiling:
            ax.annotate(f"n={r['n']}", (r["sqrt_kl"], r["gold_ceiling_mean"] + 0.015), fontsize=7)
        ax.set_xlabel("sqrt(KL bound)  [log n - (n-1)/n]")
        ax.set_ylabel("gold accuracy of the pick")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"RBoN-KL, proxy: {proxy}, {summary['prompts']} prompts", fontsize=9)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gold_row(curve: list[dict]) -> dict:
    return {f"n={r['n']}": r["gold_mean"] for r in curve} | {"half-width": max(r["gold_ci_half"] for r in curve)}


def markdown(summary: dict) -> str:
    ns = [f"n={n}" for n in overopt.ns(summary["n_max"])]
    cols = ["proxy", *ns, "half-width"]

    def rows(curves: dict) -> list[dict]:
        return [{"proxy": k} | {c: f"{v:.2f}" for c, v in gold_row(c).items()} for k, c in curves.items()]

    lines = [
        "# Reward ensembles against over-optimisation (best-of-n, gold accuracy of the pick)",
        "",
        f"Policy `{summary['policy']}`; {summary['prompts']} held-out prompts x {summary['n_max']} samples "
        f"(seed {summary['seed']}, the same samples for every proxy); members: "
        + ", ".join(f"`{m}`" for m in summary["members"])
        + ". Gold accuracy of the proxy's best-of-n pick, exact over "
        "all n-subsets; half-width: the largest 95% half-width over n.",
        "",
        "## `make overopt` runs",
        "",
        reporting.markdown_table(rows(summary["runs"]), cols, cols),
        "## Recomputed from the ensemble's samples (each member alone, uwo at other lambdas)",
        "",
        reporting.markdown_table(rows(summary["recomputed"]), cols, cols),
        "## Members (RM recipe, 1 epoch)",
        "",
        reporting.markdown_table(
            [
                {"member": m} | {k: reporting.fmt(v, 3) for k, v in summary["member_metrics"][m].items()}
                for m in summary["members"]
            ],
            ["member", "eval_accuracy_exact", "gold_auc", "gold_best_of_k_accuracy"],
        ),  # fmt: skip
    ]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in summary["runs"].items():
        x = [r["sqrt_kl"] for r in curve]
        mean, half = np.array([r["gold_mean"] for r in curve]), np.array([r["gold_ci_half"] for r in curve])
        ax.plot(x, mean, "o-", label=name)
        ax.fill_between(x, mean - half, mean + half, alpha=0.12)
    ceiling = next(iter(summary["ceiling"].values()))
    ax.plot([r["sqrt_kl"] for r in ceiling], [r["gold_ceiling_mean"] for r in ceiling], "k--", label="gold's own pick")
    for r in ceiling:
        ax.annotate(f"n={r['n']}", (r["sqrt_kl"], r["gold_ceiling_mean"] + 0.015), fontsize=7)
    ax.set_xlabel("sqrt(KL bound)  [log n - (n-1)/n]")
    ax.set_ylabel("gold accuracy of the best-of-n pick")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"weak RM vs its {len(summary['members'])}-member ensemble, {summary['prompts']} prompts", fontsize=9)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 0.06))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", nargs="+", default=[f"outputs/tiny/ensemble/rm_weak_s{s}" for s in range(5)])
    p.add_argument("--policy", default="outputs/tiny/sft")
    p.add_argument("--data", default="outputs/tiny/data")
    p.add_argument("--n_max", type=int, default=32)
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--uwo_lambda", type=float, default=0.5)
    p.add_argument("--work", default="outputs/tiny/ensemble/overopt")
    p.add_argument("--out", default="results/ensemble")
    p.add_argument("--reuse", action="store_true", help="keep the curves already under --work (rebuild the report)")
    p.add_argument("--kl_betas", type=float, nargs="+", default=list(KL_BETAS), help="RBoN-KL strengths")
    p.add_argument(
        "--extra", nargs="*", default=[], metavar="NAME=FOLDER[:RULE]",
        help="more one-folder proxies on the same samples: a WARM average (make warm-rm), a multi-head RM (scored by "
        "RULE over its heads: mean, worst, uwo)",
    )  # fmt: skip
    args = p.parse_args()
    betas = [str(b) for b in args.kl_betas]
    runs = {"single weak RM (member 0)": ["--reward_model_name_or_path", args.members[0], "--kl_betas", *betas]}
    for rule in ("mean", "worst", "uwo"):
        extra = ["--reward_uwo_lambda", str(args.uwo_lambda)] if rule == "uwo" else []
        runs[f"ensemble {rule}" + (f" (lambda {args.uwo_lambda})" if extra else "")] = [
            "--reward_ensemble", *args.members, "--reward_aggregation", rule, *extra
        ]  # fmt: skip
    for item in args.extra:
        name, _, spec = item.partition("=")
        folder, _, rule = spec.partition(":")
        runs[name] = ["--reward_model_name_or_path", folder, *(["--reward_aggregation", rule] if rule else [])]
    results, samples = {}, {}
    for name, reward in runs.items():
        folder = "".join(c if c.isalnum() or c in "-_" else "_" for c in name.split(" (")[0])
        results[name] = run_curve(args, folder, reward)
        samples[name] = reporting.read_jsonl(Path(args.work) / folder / overopt.SAMPLES_FILE)
    texts = {name: [s["responses"] for s in rows] for name, rows in samples.items()}
    if len({json.dumps(t) for t in texts.values()}) != 1:
        raise SystemExit("the runs drew different samples: the comparison would not be on the same samples")
    summary = {
        "policy": args.policy, "members": args.members, "n_max": args.n_max, "prompts": args.prompts,
        "seed": args.seed, "member_metrics": {m: member_metrics(m) for m in args.members},
        "runs": {k: r["curve"] for k, r in results.items()},
        "ceiling": {"gold": results[next(iter(results))]["curve"]},
        "recomputed": recomputed(samples["ensemble mean"]) | heads_rules(args.extra, samples),
        "kl_betas": args.kl_betas, "regularised": regularised(samples, args.kl_betas),
        "logprob_stats": logprob_stats(samples["single weak RM (member 0)"]),
        "commands": "see scripts/ensemble_overopt.py's docstring",
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reporting.write_json(summary, out / "ensemble.json")
    reporting.write_text(markdown(summary), out / "ensemble.md")
    plot(summary, out / "ensemble.png")
    reporting.write_text(regularised_markdown(summary), out / "regularised.md")
    plot_regularised(summary, out / "regularised.png")
    print(markdown(summary) + "\n" + regularised_markdown(summary))


if __name__ == "__main__":
    main()
