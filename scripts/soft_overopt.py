"""Soft best-of-n against over-optimisation, measured on gold: the pick drawn with probability softmax(proxy / T)
(RAFT's selection_temperature), on the samples scripts/ensemble_overopt.py drew (the weak RM and its 5-seed
ensemble mean as proxies; 200 held-out prompts x 32 samples), beside plain best-of-n.

    python scripts/ensemble_overopt.py --reuse      # (once) the samples, under outputs/tiny/ensemble/overopt
    python scripts/soft_overopt.py                  # results/ensemble/soft.{md,json,png}

The curves are hhrm.overopt.soft_curves: what `make overopt ARGS="--selection_temperatures ..."` reports on the same
samples.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hhrm import overopt, reporting

TEMPERATURES = (0.1, 0.3, 1.0, 3.0)
PROXIES = {"single weak RM (member 0)": "single_weak_RM", "ensemble mean": "ensemble_mean"}


def plot(curves: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), squeeze=False)
    for ax, (proxy, by_t) in zip(axes[0], curves.items()):
        for t, rows in by_t.items():
            x = [r["sqrt_kl"] for r in rows]
            ax.plot(x, [r["gold_mean"] for r in rows], "o-" if float(t) == 0 else ".--", label=f"T {t}")
        for r in by_t["0"]:
            ax.annotate(f"n={r['n']}", (r["sqrt_kl"], r["gold_mean"] + 0.015), fontsize=7)
        ax.set_xlabel("sqrt(KL bound of plain best-of-n)  [log n - (n-1)/n]")
        ax.set_ylabel("gold accuracy of the pick")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"soft best-of-n, proxy: {proxy}", fontsize=9)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="outputs/tiny/ensemble/overopt", help="scripts/ensemble_overopt.py's --work")
    p.add_argument("--out", default="results/ensemble")
    p.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES))
    p.add_argument("--seed", type=int, default=0, help="seed of the random n-subsets")
    args = p.parse_args()
    curves, spread = {}, {}
    for name, folder in PROXIES.items():
        rows = reporting.read_jsonl(Path(args.work) / folder / overopt.SAMPLES_FILE)
        proxy = np.array([r["proxy"] for r in rows], dtype=np.float64)
        gold = np.array([r["gold"] for r in rows], dtype=np.float64)
        curves[name] = overopt.soft_curves(proxy, gold, args.temperatures, args.seed)
        spread[name] = float(proxy.std(-1).mean())
    n_max, prompts = len(rows[0]["proxy"]), len(rows)
    lines = [
        "# Soft best-of-n against over-optimisation (gold accuracy of the pick)",
        "",
        f"The same {prompts} held-out prompts x {n_max} samples as ensemble.md (`python scripts/soft_overopt.py`). "
        "Pick: one of the n samples drawn with probability softmax(proxy / T), RAFT's `selection_temperature`; T 0 "
        f"is plain best-of-n. {overopt.SOFT_DRAWS} random n-subsets per prompt and n, the draw within each exact; "
        "half-width: the largest 95% half-width over n (prompts). Proxy spread within a prompt (std over its "
        + ", ".join(f"{k}: {v:.2f}" for k, v in spread.items())
        + ") is the scale T is read against.",
        "",
    ]
    for name, by_t in curves.items():
        lines += [f"## Proxy: {name}", "", overopt.soft_markdown(by_t, True).split("\n\n", 2)[2]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reporting.write_json({"temperatures": args.temperatures, "seed": args.seed, "curves": curves}, out / "soft.json")
    reporting.write_text("\n".join(lines) + "\n", out / "soft.md")
    plot(curves, out / "soft.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
