"""The best-of-n estimator behind ``make overopt`` (:mod:`hhrm.overopt`), and its regularised variant.

Plain best-of-n picks the proxy's argmax among n samples. Regularised best-of-n (Jinnai et al., 2024, RBoN-KL)
picks the argmax of ``proxy + beta * log pi(y | x)``: RBoN-KL maximises ``r(y) - beta * KL(delta_y || pi)``, and
the KL of the one-point distribution on ``y`` to the sampling policy is ``-log pi(y | x)``. ``log pi`` is the
sequence log-probability (summed over the response's tokens, its EOS included when it ended by one) at the
sampling temperature (:func:`hhrm.logprobs.sequence_logprobs`). Either way the pick is the maximum of n i.i.d.
samples under a fixed ranking, so the estimator (exact over all n-subsets) and the bound
KL(pick || policy) <= log n - (n - 1) / n hold unchanged.

Soft best-of-n (RAFT's ``selection_temperature``) draws the pick from the n samples with probability
``softmax(proxy / T)``. Within a subset that draw is averaged exactly; the subsets are :data:`SOFT_DRAWS` uniform
random ones per prompt and n (all of them for n = 1 and n = n_max), from a seeded generator, so a curve is
reproducible. The KL bound of best-of-n is kept as the x axis for comparison only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hhrm import reporting

Z95 = 1.96
SOFT_DRAWS = 2048  # random n-subsets per prompt and n for soft best-of-n (Monte Carlo error << the prompts' spread)


def check_n_max(n_max: int) -> None:
    """Refuse an ``n_max`` that is not a power of 2 of at least 2 (n = 1 alone is no curve)."""
    if n_max < 2 or n_max & (n_max - 1):
        raise ValueError(f"n_max={n_max}: must be a power of 2 and >= 2 (the curve has n = 1, 2, 4, ..., n_max)")


def check_kl_betas(betas: list[float]) -> None:
    """Refuse a negative regularisation strength (beta < 0 would reward unlikely samples)."""
    bad = [b for b in betas if not b > 0]
    if bad:
        raise ValueError(f"kl_betas={bad}: each must be > 0 (the plain curve is beta = 0, always reported)")


def check_soft_temperatures(temperatures: list[float]) -> None:
    """Refuse a soft best-of-n temperature that is not > 0 (T = 0 is plain best-of-n, always reported)."""
    bad = [t for t in temperatures if not t > 0]
    if bad:
        raise ValueError(f"selection_temperatures={bad}: each must be > 0 (T = 0 is plain best-of-n, always reported)")


def ns(n_max: int) -> list[int]:
    """1, 2, 4, ..., n_max."""
    check_n_max(n_max)
    return [2**j for j in range(int(math.log2(n_max)) + 1)]


def kl_bound(n: int) -> float:
    """The analytic bound on KL(best-of-n || policy): log n - (n - 1) / n (0 for n = 1)."""
    if n < 1:
        raise ValueError(f"n={n}: must be >= 1")
    return math.log(n) - (n - 1) / n


def pick_weights(n_max: int, n: int) -> np.ndarray:
    """``w[i]``: probability that the sample of ascending rank ``i + 1`` is the max of a random n-subset."""
    if not 1 <= n <= n_max:
        raise ValueError(f"n={n}: must be within [1, n_max={n_max}]")
    total = math.comb(n_max, n)
    return np.array([math.comb(i, n - 1) / total for i in range(n_max)], dtype=np.float64)


def rank_order(proxy: np.ndarray) -> np.ndarray:
    """Per row, the sample indices in ascending proxy order; among ties the lower index ranks higher."""
    proxy = np.asarray(proxy, dtype=np.float64)
    index = np.broadcast_to(np.arange(proxy.shape[-1]), proxy.shape)
    return np.lexsort((-index, proxy), axis=-1)


def best_of_n(proxy: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per prompt (row), the expected ``values`` of the proxy's best-of-n pick over all n-subsets of the samples.

    ``proxy`` and ``values``: ``[prompts, n_max]``. ``values = proxy`` gives the pick's proxy reward.
    """
    proxy, values = np.asarray(proxy, dtype=np.float64), np.asarray(values, dtype=np.float64)
    order = rank_order(proxy)
    ranked = np.take_along_axis(values, order, axis=-1)
    return ranked @ pick_weights(proxy.shape[-1], n)


def gold_ceiling(gold: np.ndarray, n: int) -> np.ndarray:
    """Per prompt, the gold accuracy of the gold reward's own best-of-n pick: P(at least one of n is correct)."""
    gold = np.asarray(gold, dtype=np.float64)
    n_max = gold.shape[-1]
    correct = (gold > 0).sum(axis=-1)
    total = math.comb(n_max, n)
    return np.array([1.0 - math.comb(n_max - int(c), n) / total for c in correct])


def mean_ci(values: np.ndarray) -> tuple[float, float | None]:
    """Mean over prompts and the 95% half-width 1.96 * std / sqrt(prompts) (None for one prompt)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), None
    return float(values.mean()), float(Z95 * values.std(ddof=1) / math.sqrt(len(values)))


def _interval(name: str, values: np.ndarray) -> dict[str, Any]:
    mean, half = mean_ci(values)
    ci = None if half is None else [mean - half, mean + half]
    return {f"{name}_mean": mean, f"{name}_ci_half": half, f"{name}_ci": ci}


def curve(
    proxy: np.ndarray, gold: np.ndarray | None = None, score: np.ndarray | None = None, logprobs=None, pick=None
) -> list[dict[str, Any]]:
    """One row per n = 1, 2, ..., n_max (see :mod:`hhrm.overopt`); gold columns only when ``gold`` is given.

    ``score``: what picks (default the proxy; the regularised score for RBoN); the ``proxy`` columns stay the proxy
    reward of the pick. ``logprobs``: adds ``logprob``, the pick's mean log pi(y|x). ``pick(values, n)``: the
    per-prompt expected ``values`` of another selection rule (default best-of-n by ``score``).
    """
    proxy = np.asarray(proxy, dtype=np.float64)
    if proxy.ndim != 2 or not len(proxy):
        raise ValueError(f"proxy rewards must be [prompts, n_max] with at least one prompt, got shape {proxy.shape}")
    score = proxy if score is None else np.asarray(score, dtype=np.float64)
    pick = pick or (lambda values, n: best_of_n(score, values, n))
    rows = []
    for n in ns(proxy.shape[1]):
        kl = kl_bound(n)
        row: dict[str, Any] = {"n": n, "kl_bound": kl, "sqrt_kl": math.sqrt(kl)}
        row |= _interval("proxy", pick(proxy, n))
        if gold is not None:
            row |= _interval("gold", pick(gold, n))
            row |= _interval("gold_ceiling", gold_ceiling(gold, n))
        if logprobs is not None:
            row |= _interval("logprob", pick(logprobs, n))
        rows.append(row)
    return rows


def regularised_curves(
    proxy: np.ndarray, logprobs: np.ndarray, gold: np.ndarray | None, betas: list[float]
) -> dict[str, list[dict[str, Any]]]:
    """``{"beta": curve}`` for beta = 0 (plain best-of-n) and each of ``betas``: the pick is the argmax of
    ``proxy + beta * logprobs``; every curve on the same samples, with the pick's mean log pi as ``logprob``."""
    check_kl_betas(betas)
    proxy, logprobs = np.asarray(proxy, dtype=np.float64), np.asarray(logprobs, dtype=np.float64)
    if logprobs.shape != proxy.shape:
        raise ValueError(f"log-probs of shape {logprobs.shape} for proxy rewards of shape {proxy.shape}")
    return {f"{b:g}": curve(proxy, gold, proxy + b * logprobs, logprobs) for b in [0.0, *betas]}


def regularised_from_samples(rows: list[dict[str, Any]], betas: list[float]) -> dict[str, list[dict[str, Any]]]:
    """:func:`regularised_curves` recomputed from the rows of a ``samples.jsonl`` that holds ``logprobs``."""
    if not rows or any(r.get("logprobs") is None for r in rows):
        raise ValueError("the samples have no logprobs: run make overopt with kl_betas set to record them")
    has_gold = all(r.get("gold") is not None for r in rows)
    gold = np.array([r["gold"] for r in rows], dtype=np.float64) if has_gold else None
    return regularised_curves([r["proxy"] for r in rows], [r["logprobs"] for r in rows], gold, betas)


def _per_n_markdown(curves: dict[str, list[dict[str, Any]]], gold: bool, name: str, extra=()) -> str:
    """One row per setting (``name``: its column; "0" is plain best-of-n): the pick's gold accuracy (or, without
    gold, proxy reward) per n, ``extra`` columns ``(title, row -> value)`` read at n_max, and the largest 95%
    half-width over n."""
    key = "gold" if gold else "proxy"
    first = next(iter(curves.values()))
    cols = [name, *[f"n={r['n']}" for r in first], *[title for title, _ in extra], "half-width"]
    rows = []
    for setting, rows_s in curves.items():
        row = {name: setting + (" (plain best-of-n)" if float(setting) == 0 else "")}
        row |= {f"n={r['n']}": reporting.fmt(r[f"{key}_mean"], 3) for r in rows_s}
        row |= {title: reporting.fmt(value(rows_s[-1]), 3) for title, value in extra}
        row["half-width"] = reporting.fmt(max(r[f"{key}_ci_half"] or 0.0 for r in rows_s), 2)
        rows.append(row)
    return reporting.markdown_table(rows, cols)


def regularised_markdown(curves: dict[str, list[dict[str, Any]]], gold: bool) -> str:
    """One row per beta: the gold accuracy (or, without gold, the proxy reward) of the pick per n, and its mean
    log pi at n_max."""
    what = "gold accuracy" if gold else "proxy reward"
    head = (
        f"## Regularised best-of-n (RBoN-KL): pick argmax proxy + beta * log pi(y|x)\n\n{what.capitalize()} of the "
        "pick per n (log pi: sequence log-prob under the sampling policy, summed over response tokens); "
        "half-width: the largest 95% half-width over n.\n\n"
    )
    return head + _per_n_markdown(curves, gold, "beta", [("log pi (n_max)", lambda r: r["logprob_mean"])])


def soft_best_of_n(
    proxy: np.ndarray, values: np.ndarray, n: int, temperature: float, draws: int = SOFT_DRAWS, seed: int = 0
) -> np.ndarray:
    """Per prompt (row), the expected ``values`` of soft best-of-n: a uniform n-subset of the samples, the pick
    drawn from it with probability ``softmax(proxy / temperature)`` (see the module's docstring)."""
    check_soft_temperatures([temperature])
    proxy, values = np.asarray(proxy, dtype=np.float64), np.asarray(values, dtype=np.float64)
    n_max = proxy.shape[-1]
    if not 1 <= n <= n_max:
        raise ValueError(f"n={n}: must be within [1, n_max={n_max}]")
    if n == 1:
        return values.mean(axis=-1)
    rng = np.random.default_rng(seed)
    out = np.empty(len(proxy))
    for i, (p, v) in enumerate(zip(proxy, values)):
        subsets = np.arange(n_max)[None] if n == n_max else np.argsort(rng.random((draws, n_max)), axis=-1)[:, :n]
        z = p[subsets] / temperature
        w = np.exp(z - z.max(axis=-1, keepdims=True))  # shifted: never overflows
        out[i] = float(((w / w.sum(axis=-1, keepdims=True)) * v[subsets]).sum(axis=-1).mean())
    return out


def soft_curves(
    proxy: np.ndarray, gold: np.ndarray | None, temperatures: list[float], seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """``{"T": curve}`` for T = 0 (plain best-of-n, exact) and each soft temperature, on the same samples."""
    check_soft_temperatures(temperatures)
    proxy = np.asarray(proxy, dtype=np.float64)
    out = {"0": curve(proxy, gold)}
    for t in temperatures:
        out[f"{t:g}"] = curve(proxy, gold, pick=lambda values, n, t=t: soft_best_of_n(proxy, values, n, t, seed=seed))
    return out


def soft_markdown(curves: dict[str, list[dict[str, Any]]], gold: bool) -> str:
    """One row per temperature: the gold accuracy (or, without gold, the proxy reward) of the soft pick per n."""
    what = "gold accuracy" if gold else "proxy reward"
    head = (
        f"## Soft best-of-n: pick drawn with probability softmax(proxy / T)\n\n{what.capitalize()} of the pick per "
        f"n (RAFT's selection_temperature; {SOFT_DRAWS} random n-subsets per prompt, the draw within each exact); "
        "half-width: the largest 95% half-width over n.\n\n"
    )
    return head + _per_n_markdown(curves, gold, "T")
