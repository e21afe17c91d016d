"""RAFT's run folder: stage outputs, done markers, rows shared across processes, the final policy's files.

Every stage output is written whole and renamed into place (:func:`hhrm.reporting.write_jsonl`), so
its presence means "stage done". A policy folder is done once its ``raft_done`` marker is there: the
folder is written as ``policy.tmp`` and renamed after the marker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object

from hhrm import outputs
from hhrm.model_checks import weights_identity
from hhrm.reporting import config_dict, read_json
from hhrm.reward import sources

POLICY_DONE = "raft_done"
# Settings that do not change what a finished stage wrote: a resume may change them.
# (generation_batch_size is not one: how prompts are batched changes the samples.)
RESUMABLE_SETTINGS = {
    "progress",
    "stop_after",
    "logging_steps",
    "disable_tqdm",
    "output_dir",
    "overwrite_output_dir",
    "offload_models",
    *sources.HOW_TO_REACH,  # where and how the RM is reached, not which: the source's identity is in the inputs
    "vllm_server_host",  # where the generation server runs, not what it generates with (RAFT pushes the policy)
    "vllm_server_port",
    "vllm_server_base_url",
    "vllm_server_timeout",
    "vllm_group_port",
    "logging_dir",
    "run_name",
}


def iter_dir(run_dir: Path, iteration: int) -> Path:
    return run_dir / f"iter_{iteration:03d}"


def is_done(path: Path) -> bool:
    """A stage output exists (policy folders count once their marker is there)."""
    if path.suffix == "" and not path.name.endswith("jsonl"):
        return (path / POLICY_DONE).is_file()
    return path.is_file()


def shard(items: list[Any], rank: int, world: int) -> list[Any]:
    """Rank ``rank``'s share: every ``world``-th item, so shards differ in size by at most one."""
    return items[rank::world]


def gather_rows(rows: list[dict[str, Any]], key: str, expected: list[Any]) -> list[dict[str, Any]]:
    """All ranks' rows, in ``expected`` order; fails if a key is missing or handled twice."""
    everyone = gather_object(rows)
    by_key: dict[Any, dict[str, Any]] = {}
    for row in everyone:
        if row[key] in by_key:
            raise RuntimeError(f"{key}={row[key]!r} was handled by two processes")
        by_key[row[key]] = row
    missing = [k for k in expected if k not in by_key]
    if missing or len(by_key) != len(expected):
        raise RuntimeError(f"{len(missing)} {key}s were lost across processes (e.g. {missing[:3]})")
    return [by_key[k] for k in expected]


def publish_policy(tmp: Path, final: Path, iteration: int) -> None:
    """Mark a freshly saved policy folder done and move it into place (main process only)."""
    (tmp / POLICY_DONE).write_text(f"iteration {iteration}\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def link_policy(src: Path, dst: Path) -> None:
    """Put the final policy's files in ``dst`` (hard links where possible: no second copy of a 7B model).

    Each file is linked (or copied) to a temporary name and renamed over the old one, so ``dst`` never holds half a
    file, and a failed copy leaves no temporary file behind; a full disk is one line with the space needed."""
    for f in src.iterdir():
        if f.is_file() and f.name != POLICY_DONE:
            target, tmp = dst / f.name, dst / f"{f.name}.tmp"
            tmp.unlink(missing_ok=True)
            try:
                with outputs.space_errors(dst, f.stat().st_size, f"the final policy's {f.name}"):
                    try:
                        os.link(f, tmp)
                    except OSError:
                        shutil.copy2(f, tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def fine_tune_space(it_dir: Path, policy: str, dtype: str | None, main: bool) -> Iterator[None]:
    """Around an iteration's fine-tune (every rank): refuse it before training when the run folder's disk cannot
    hold the new policy (``policy``'s weights in the ``dtype`` it is loaded and saved in, float32 unset); if it
    fails, remove the half-written ``policy.tmp`` and its datasets' cache (a re-run starts the fine-tune afresh
    anyway), so a full disk is not left full."""
    if not is_done(it_dir / "policy"):
        need = outputs.weights_bytes(policy, dtype or "float32")
        outputs.check_free_space(it_dir.parent, need, f"the policy of {it_dir.name} (the size of {policy})")
    try:
        yield
    except BaseException:
        if main:
            for folder in (it_dir / "policy.tmp", it_dir / "policy.tmp.cache"):  # see hhrm.raft.update.cache_dir
                shutil.rmtree(folder, ignore_errors=True)
        raise


def run_fingerprint(
    args: Any, data_args: Any, model_args: Any, world_size: int, reward_identity: dict[str, Any]
) -> dict[str, Any]:
    """What a finished stage's outputs depend on (JSON-safe): settings, the input models' files, the process count.

    The models are identified by their weight files' names, sizes and modification times, so a policy or
    reward model retrained at the same path is a different input (``make rm && make raft`` is refused
    rather than reporting the old numbers). The reward model is what its source says scores
    (:mod:`hhrm.reward.sources`: a folder's weights and convention, or what a server says it serves).
    """
    raft_args = {k: v for k, v in config_dict(args).items() if k not in RESUMABLE_SETTINGS}
    inputs = {
        "policy": weights_identity(model_args.model_name_or_path),
        "reward_model": reward_identity,
        "world_size": world_size,
    }
    return {
        "data": config_dict(data_args),
        "model": model_args.model_name_or_path,
        "raft": raft_args,
        "inputs": inputs,
    }


def setting_defaults(**configs: Any) -> dict[str, dict[str, Any]]:
    """Per fingerprint part (``raft=args, data=data_args``), each setting's default (JSON-safe, as fingerprinted)."""
    out: dict[str, dict[str, Any]] = {}
    for part, config in configs.items():
        defaults = {}
        for f in dataclasses.fields(config):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
        out[part] = json.loads(json.dumps(defaults, default=str))
    return out


def check_resume(
    run_dir: Path, fingerprint: dict[str, Any], defaults: dict[str, dict[str, Any]] | None = None
) -> None:
    """Refuse to resume a run folder written with other settings: it would mix two runs. A setting the folder's
    fingerprint lacks (added by a later hhrm) counts as unchanged while it is at its default (``defaults``)."""
    previous = read_json(run_dir / "run.json").get("fingerprint")
    if previous is None:
        return
    missing = object()

    def differs(part: str, k: str) -> bool:
        now, before = fingerprint[part].get(k), previous.get(part, {}).get(k, missing)
        if before is missing:
            return now != (defaults or {}).get(part, {}).get(k)
        return now != before

    changed = sorted(
        f"{part}.{k}"
        for part in fingerprint
        if isinstance(fingerprint[part], dict)
        for k in (set(fingerprint[part]) | set(previous.get(part, {})))
        if differs(part, k)
    )
    if previous.get("model") != fingerprint["model"]:
        changed.append("model_name_or_path")
    if changed:
        raise ValueError(
            f"output_dir={str(run_dir)!r} holds a RAFT run with other settings ({', '.join(changed[:8])}); "
            "resuming would mix two runs: use a new output_dir or delete that folder"
        )
