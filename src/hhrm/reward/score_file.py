"""The scoring command: every response of a data file scored by a reward model, written back beside its row.

Input: any preference format hhrm reads (pairs: :data:`hhrm.formats.REGISTRY`) or prompt/response
rows (``{"prompt", "response"}`` or TRL's ``{"prompt", "completion"}``), from a local file or folder or a hub
id. Every row goes through the one text rule (:mod:`hhrm.formats`) into (prompt, response) pairs (a pair row: (prompt,
chosen) and (prompt, rejected)), scored by the reward source (:mod:`hhrm.reward.sources`: a folder under its
``reward_convention``, hhrm's by default: text + EOS, read at the EOS; or a reward server), so
a score here equals the score the RM was evaluated with and RAFT scores with.

Output: the input rows, in input order and all of them, with ``chosen_reward``/``rejected_reward`` (pairs)
or ``reward`` (responses) added; a row that could not be read or rendered keeps null rewards and says why
in ``bad_row``; from an ensemble (``reward_ensemble``) each reward column ``c`` also has ``c_mean``, ``c_std``
and ``c_members``. JSON lines or Parquet (by the file's suffix), plus ``<output_file>.metrics.json`` (``a.jsonl``
and ``a.parquet`` each keep their own) with the counts, the reward statistics, what scored (``reward``: the source's
identity, its convention and an ensemble's rule included) and, for pairs, the pairwise accuracy (ties count as
wrong, as in :mod:`hhrm.rm.evaluation`). What would only fail at the end is refused before the model is
loaded: an output folder that cannot be written, rows that do not fit one Parquet schema. A failed write (a full
disk) leaves no partial file behind, and an existing output whole.

Under ``accelerate launch`` each process scores one contiguous shard of the rows; the main process gathers
them, checks that every row came back exactly once, and writes the file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from hhrm import data, data_io, finite, formats, reporting, runtime
from hhrm.reward import conventions, ensemble, sources
from hhrm.reward.score_output import check_writable, parquet_table, whole_or_nothing, write_rows

logger = logging.getLogger(__name__)

KINDS = ("auto", *formats.KINDS)
OUTPUT_SUFFIXES = (".jsonl", ".parquet")
HEADLINE = ("rows", "scored", "bad_rows", "accuracy", "reward_mean", "seconds")
REWARD_COLUMNS = {"pairs": ("chosen_reward", "rejected_reward"), "responses": ("reward",)}


@dataclass
class ScoreDataArguments:
    """The rows to score."""

    dataset_name: str = field(
        default=None,
        metadata={
            "help": "Input: a local .jsonl[.gz]/.json/.parquet file, a folder holding <split>.<ext>, or a hub id."
        },
    )
    split: str = field(
        default="test", metadata={"help": "Split (file stem) to read when dataset_name is a folder/hub id."}
    )
    input_kind: str = field(
        default="auto",
        metadata={
            "help": "pairs (chosen/rejected: any preference format) | responses (prompt + response or completion) | "
            "auto (pairs if the rows have chosen/rejected, responses if they have response/completion).",
            "choices": list(KINDS),
        },
    )
    dataset_format: str = field(
        default="auto",
        metadata={
            "help": f"Format of the rows: {' | '.join(formats.choices())} (README: 'Data formats').",
            "choices": list(formats.choices()),
        },
    )
    use_chat_template: bool = field(
        default=False,
        metadata={"help": "Render with the reward tokenizer's chat template: set it as the RM was trained."},
    )
    max_rows: int | None = field(default=None, metadata={"help": "Score only the first N rows (quick runs)."})
    max_bad_row_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of rows that may be unreadable before the run is refused (1.0 accepts any)."},
    )

    def __post_init__(self) -> None:
        finite.check_finite_settings(self)
        if not self.dataset_name:
            raise ValueError("dataset_name is required: the file (or folder) of rows to score (make score DATA=...)")
        if self.input_kind not in KINDS:
            raise ValueError(f"input_kind={self.input_kind!r}: expected one of {KINDS}")
        if self.dataset_format != "auto":
            formats.by_name(self.dataset_format, "pairs")  # refused, naming the choices
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows={self.max_rows}: must be >= 1, or left unset to score every row")
        if not 0.0 <= self.max_bad_row_fraction <= 1.0:
            raise ValueError(f"max_bad_row_fraction={self.max_bad_row_fraction}: must be within [0, 1]")


@dataclass
class ScoreConfig(sources.RewardArguments):
    """Where the scores go and how they are computed. The reward model: ``model_name_or_path`` (ModelConfig, ``make
    score MODEL=``) or ``reward_model_name_or_path`` (the same folder), or a reward server (``RewardArguments``)."""

    output_file: str = field(
        default=None, metadata={"help": "Output file: .jsonl or .parquet (the input rows with reward columns)."}
    )
    overwrite_output: bool = field(default=False, metadata={"help": "Replace output_file if it exists."})
    max_tokens_per_batch: int = field(default=32_768, metadata={"help": "Padded tokens per forward, at most."})
    bf16: bool | None = field(default=None, metadata={"help": "None: bf16 on a bf16-capable GPU, fp32 elsewhere."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar (main process)."})
    ddp_timeout: int = field(default=1800, metadata={"help": "Seconds a process waits for the others to gather."})

    def __post_init__(self) -> None:
        finite.check_finite_settings(self)
        if not self.output_file:
            raise ValueError("output_file is required: a .jsonl or .parquet path (make score OUT=...)")
        if Path(self.output_file).suffix not in OUTPUT_SUFFIXES:  # ".jsonl" alone is a dotfile with no suffix
            raise ValueError(
                f"output_file={self.output_file!r}: the file name must be <name>.jsonl or <name>.parquet "
                "(e.g. scores.jsonl)"
            )
        if Path(self.output_file).is_dir():
            raise ValueError(f"output_file={self.output_file!r} is a folder: name a file in it (e.g. scores.jsonl)")
        if Path(self.output_file).exists() and not self.overwrite_output:
            raise ValueError(
                f"output_file={self.output_file!r} exists: choose another output_file, or pass --overwrite_output true"
            )
        if self.reward_batch_size < 1 or self.max_tokens_per_batch < 1:
            raise ValueError(
                f"reward_batch_size={self.reward_batch_size}, max_tokens_per_batch={self.max_tokens_per_batch}: "
                "must be >= 1"
            )
        if self.reward_convention is not None:
            conventions.by_name(self.reward_convention)
        check_writable(self.output_file)


def metrics_path(output_file: str | os.PathLike) -> Path:
    """``scores.jsonl`` -> ``scores.jsonl.metrics.json``: the full name, so ``a.jsonl`` and ``a.parquet`` keep
    their own metrics."""
    path = Path(output_file)
    return path.with_name(path.name + ".metrics.json")


# --------------------------------------------------------------------------------------------
# Input


@dataclass
class ScoreInput:
    rows: list[Any]  # the input rows, as read (marker rows for unreadable lines)
    kind: str  # pairs | responses
    fmt: str  # the rows' format (detected or stated)
    rule: Any  # the text rule the rows were rendered with (hhrm.formats.TextRule); bad rows are re-checked by it
    table: Any  # datasets.Dataset: prompt + chosen/rejected or response, and ``row`` (input index)
    drops: data.DropReport

    def pairs(self, start: int, stop: int) -> tuple[list[str], list[str]]:
        """(prompt, response) pairs of table rows ``start:stop``: per row, chosen then rejected, or the response."""
        batch = self.table[start:stop]
        if self.kind == "responses":
            return list(batch["prompt"]), list(batch["response"])
        per_row = [(p, r) for p, c, rj in zip(batch["prompt"], batch["chosen"], batch["rejected"]) for r in (c, rj)]
        return [p for p, _ in per_row], [r for _, r in per_row]


def detect_kind(rows: list[Any], kind: str) -> str:
    """``pairs`` or ``responses`` from the first object rows' columns (``input_kind=auto``)."""
    if kind != "auto":
        return kind
    for row in rows[:100]:
        if not isinstance(row, dict) or data_io.is_marker(row):
            continue
        if "chosen" in row or "rejected" in row:
            return "pairs"
        if "response" in row or "completion" in row:
            return "responses"
    objects = [r for r in rows[:100] if isinstance(r, dict) and not data_io.is_marker(r)]
    found = f"columns {sorted(map(str, objects[0]))}" if objects else "no row that is a JSON object"
    raise ValueError(
        f"input_kind: the rows have neither chosen/rejected pairs nor a prompt with a response (or completion): "
        f"found {found}; check dataset_name, or state input_kind=pairs|responses"
    )


def load_rows(args: ScoreDataArguments) -> list[Any]:
    """The input rows as read (up to ``max_rows``); refused when there is none."""
    rows = data_io.read_rows(args.dataset_name, args.split)
    if args.max_rows is not None:
        rows = rows[: args.max_rows]
    if not rows:
        raise ValueError(f"dataset_name={args.dataset_name!r}: no rows to score")
    return rows


def read_input(args: ScoreDataArguments, tokenizer, rows: list[Any] | None = None) -> ScoreInput:
    """Render the rows (read here unless given; refused early: no usable row, or too many bad rows)."""
    rows = load_rows(args) if rows is None else rows
    kind = detect_kind(rows, args.input_kind)
    rule = formats.text_rule(args, tokenizer)
    name = Path(args.dataset_name).name
    fmt = formats.detect(rows, kind) if args.dataset_format == "auto" else args.dataset_format
    normalize = data.normalize_rows if kind == "pairs" else data.normalize_completions
    table, drops = normalize(rows, fmt, name, rule=rule)
    share = drops.dropped / drops.seen
    if not len(table) or share > args.max_bad_row_fraction:
        raise ValueError(
            f"dataset_name={args.dataset_name!r}: {drops.dropped} of {drops.seen} rows cannot be scored as {kind} "
            f"({drops.reasons(top=3)}); fix the rows, set dataset_format/input_kind, or raise max_bad_row_fraction "
            f"(now {args.max_bad_row_fraction})"
        )
    if drops.dropped:
        logger.warning(drops.summary("rows not scored"))
    return ScoreInput(rows=rows, kind=kind, fmt=fmt, rule=rule, table=table, drops=drops)


# --------------------------------------------------------------------------------------------
# Scoring one process's shard


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``n`` rows for ``rank`` of ``world``: together they cover each row once."""
    return n * rank // world, n * (rank + 1) // world


def fits_model(source: sources.RewardSource):
    """``fits(prompts, responses) -> [bool]``: whether each pair's input by the folder's convention fits the model's
    positions. A server checks its own (and refuses, 413)."""
    if isinstance(source, ensemble.Ensemble):  # a text must fit every member
        return lambda ps, rs: [all(f) for f in zip(*(fits_model(m)(ps, rs) for m in source.members))]
    if not isinstance(source, sources.LocalModel):
        return lambda prompts, responses: [True] * len(prompts)
    limit = getattr(source.scorer.model.config, "max_position_embeddings", None)
    tokenizer, convention = source.tokenizer, source.convention
    return lambda prompts, responses: [
        limit is None or len(x) <= limit for x in conventions.encode(tokenizer, prompts, responses, convention)
    ]


def score_shard(
    source: sources.RewardSource, inp: ScoreInput, start: int, stop: int, progress: bool, batch_size: int = 64
) -> list[tuple[int, list[float | None], str | None, dict]]:
    """``(input row, rewards, why not, uncertainty columns)`` for table rows ``start:stop``; a text longer than a
    folder's model positions gets no reward (``too_long``) instead of failing the run."""
    from tqdm.auto import tqdm

    per_row = 2 if inp.kind == "pairs" else 1
    fits_of = fits_model(source)
    chunk = max(batch_size * 16, 1024) // per_row
    out: list[tuple[int, list[float | None], str | None, dict]] = []
    with tqdm(total=stop - start, desc="scoring", unit="row", disable=not progress) as bar:
        for lo in range(start, stop, chunk):
            hi = min(lo + chunk, stop)
            prompts, responses = inp.pairs(lo, hi)
            fits = fits_of(prompts, responses)
            kept = [i for i, ok in enumerate(fits) if ok]
            scores = iter(ensemble.per_text(source, [prompts[i] for i in kept], [responses[i] for i in kept]))
            values = [next(scores) if ok else (None, {}) for ok in fits]
            for j, row in enumerate(inp.table[lo:hi]["row"]):
                mine = values[j * per_row : (j + 1) * per_row]
                rewards = [r for r, _ in mine]
                extra = {f"{c}_{k}": v for c, (_, e) in zip(REWARD_COLUMNS[inp.kind], mine) for k, v in e.items()}
                out.append((row, rewards, None if None not in rewards else "too_long", extra))
            bar.update(hi - lo)
    return out


# --------------------------------------------------------------------------------------------
# Output


def output_rows(
    inp: ScoreInput, scored: dict[int, tuple[list[float | None], str | None, dict]], ensemble_size: int = 0
) -> list[dict]:
    """Every input row, in order, with its reward columns (null and ``bad_row`` when it has none); from an ensemble
    of ``ensemble_size`` members also ``<column>_mean``, ``_std`` and ``_members`` (null where not scored)."""
    columns = REWARD_COLUMNS[inp.kind]
    missing = {f"{c}_{k}": None for c in columns for k in ensemble.COLUMNS} if ensemble_size else {}
    fmt_rows: list[dict] = []
    for i, row in enumerate(inp.rows):
        out = _as_object(row)
        if i in scored:
            rewards, why, extra = scored[i]
        else:
            rewards, why, extra = [None] * len(columns), _why_bad(row, inp), {}
        out |= dict(zip(columns, rewards)) | missing | extra | {"bad_row": why}
        fmt_rows.append(out)
    return fmt_rows


def _why_bad(row: Any, inp: ScoreInput) -> str:
    """The reason a row was not scored (re-derived for the few bad rows: the report keeps counts only)."""
    one = data.normalize_rows if inp.kind == "pairs" else data.normalize_completions
    _, report = one([row], inp.fmt, "row", rule=inp.rule)
    return next(iter(report.counts), "unreadable")


def _as_object(row: Any) -> dict:
    """An output row: the input object, or a row that is no JSON object as ``{"value": row}``."""
    return dict(row) if isinstance(row, dict) else {"value": row}


def check_output_schema(rows: list[Any], kind: str, output_file: str, ensemble_size: int = 0) -> None:
    """Refuse now, not after scoring every row, rows that Parquet cannot hold as one table: the output rows are
    built with placeholder rewards (float) and reasons (string), the types the real ones have."""
    if Path(output_file).suffix == ".parquet":
        placeholder = dict.fromkeys(REWARD_COLUMNS[kind], 0.0) | {"bad_row": ""}
        for c in REWARD_COLUMNS[kind] if ensemble_size else ():
            placeholder |= {f"{c}_mean": 0.0, f"{c}_std": 0.0, f"{c}_members": [0.0] * ensemble_size}
        parquet_table([_as_object(row) | placeholder for row in rows], output_file)


def summarize(inp: ScoreInput, rows: list[dict], seconds: float) -> dict[str, Any]:
    """Counts, reward statistics and, for pairs, the pairwise accuracy over the scored pairs."""
    columns = REWARD_COLUMNS[inp.kind]
    scored = [r for r in rows if all(r[c] is not None for c in columns)]
    bad: dict[str, int] = {}
    for r in rows:
        if r.get("bad_row"):
            bad[r["bad_row"]] = bad.get(r["bad_row"], 0) + 1
    values = np.array([r[c] for r in scored for c in columns], dtype=np.float64)
    m: dict[str, Any] = {
        "kind": inp.kind,
        "rows": len(rows),
        "scored": len(scored),
        "bad_rows": sum(bad.values()),
        "bad_rows_by_reason": bad,
        "bad_row_examples": inp.drops.examples,
        "reward_mean": float(values.mean()) if len(values) else None,
        "reward_std": float(values.std()) if len(values) else None,
        "seconds": seconds,
    }
    if inp.kind == "pairs" and scored:
        margin = np.array([r["chosen_reward"] - r["rejected_reward"] for r in scored])
        m |= {
            "accuracy": float((margin > 0).mean()),
            "ties": int((margin == 0).sum()),
            "margin_mean": float(margin.mean()),
        }
    return m


def reward_arguments(args: ScoreConfig, model_path: str | None) -> sources.RewardArguments:
    """The reward settings, checked; ``model_path`` (``--model_name_or_path``: ``make score MODEL=``) is the folder."""
    folder = args.reward_model_name_or_path
    if model_path and folder and str(model_path) != folder:
        raise ValueError(
            f"model_name_or_path={str(model_path)!r} and reward_model_name_or_path={folder!r} name two reward "
            "models: give one"
        )
    values = {f.name: getattr(args, f.name) for f in fields(sources.RewardArguments)}
    reward = sources.RewardArguments(**values | {"reward_model_name_or_path": folder or model_path or None})
    reward.check_reward_source()
    return reward


def build_source(args: ScoreConfig, model_path: str | None, device) -> sources.RewardSource:
    """The reward source (a folder is checked and its convention resolved here; its weights load at first use)."""
    reward = reward_arguments(args, model_path)
    setting = "reward_model_name_or_path" if args.reward_model_name_or_path else "model_name_or_path"
    return sources.build(reward, str(device), runtime.torch_dtype(args.bf16), args.max_tokens_per_batch, setting)


def run(data_args: ScoreDataArguments, args: ScoreConfig, model_path: str | None) -> dict[str, Any]:
    """Score every row (sharded over the processes), write the output file and its metrics (main process)."""
    import time

    from accelerate.utils import gather_object

    start = time.perf_counter()
    state = runtime.process_state(args)
    rows = load_rows(data_args)  # before the model: what cannot be written is refused before any work
    size = ensemble.size_of(args, model_path)  # an ensemble's members (a multi-head RM's heads) are columns too
    check_output_schema(rows, detect_kind(rows, data_args.input_kind), args.output_file, size)
    source = build_source(args, model_path, state.device)
    if data_args.use_chat_template and not hasattr(source, "tokenizer"):
        raise ValueError(
            f"use_chat_template=true renders rows by the reward tokenizer, which a reward_api={args.reward_api} "
            "server does not share here: render them beforehand, or score the folder"
        )
    inp = read_input(data_args, getattr(source, "tokenizer", None), rows)
    lo, hi = shard_bounds(len(inp.table), state.process_index, state.num_processes)
    mine = score_shard(source, inp, lo, hi, args.progress and state.is_main_process, args.reward_batch_size)
    everything = gather_object(mine) if state.num_processes > 1 else mine
    metrics: dict[str, Any] = {}
    if state.is_main_process:
        scored = {row: (rewards, why, extra) for row, rewards, why, extra in everything}
        if len(scored) != len(everything) or sorted(scored) != list(inp.table["row"]):
            raise RuntimeError(f"gathered {len(everything)} scored rows for {len(inp.table)} rows: a shard was lost")
        rows = output_rows(inp, scored, size)
        write_rows(rows, args.output_file)
        metrics = summarize(inp, rows, time.perf_counter() - start)
        identity = source.identity()
        metrics |= {"reward_model": sources.address(reward_arguments(args, model_path)), "reward": identity}
        metrics["reward_convention"] = identity.get("convention")
        metrics |= {"input": data_args.dataset_name, "output": args.output_file, "processes": state.num_processes}
        with whole_or_nothing(metrics_path(args.output_file)):
            reporting.write_json(metrics, metrics_path(args.output_file))  # its .tmp is <name>.tmp too
    state.wait_for_everyone()
    state.destroy_process_group()  # leave the gloo/NCCL group together: a rank exiting inside it can abort the rest
    return metrics
