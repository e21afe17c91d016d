"""A run's lifetime (issue 22, item 4): a folder that a run writes is locked, so a second run into it is refused in one
line; a comparison killed with ``kill -9`` takes its RAFT run with it, and leaves no lock that refuses a re-run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from hhrm import lifetime

from conftest import QUICK_TEST_OFFSET, ROOT


def _env() -> dict[str, str]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", lifetime.PARENT_ENV):
        env.pop(name, None)
    return env


def test_a_recipe_into_a_folder_another_run_writes_is_refused_in_one_line(tiny, tmp_path):
    out = tmp_path / "sft"
    lifetime.lock_folder(out)  # this process plays the run that writes the folder
    try:
        cmd = [sys.executable, "recipes/sft.py", "--config", "recipes/configs/tiny/sft.yaml"]
        cmd += ["--model_name_or_path", str(tiny["base"]), "--dataset_name", str(tiny["data"])]
        proc = subprocess.run(cmd + ["--output_dir", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=600)  # fmt: skip
    finally:
        lifetime.unlock_folder(out)
    report = f"exit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, report
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"hhrm: error: output_dir={str(out)!r} is being written by another run (pid {os.getpid()}, "
    )
    assert "wait for it to finish, stop it, or choose another output_dir" in last
    assert list(out.iterdir()) == []  # nothing written, and the released lock's file is gone


# --------------------------------------------------------------------------------------------
# kill -9 of a comparison: its RAFT run dies with it


def _arm(models: dict[str, Path], path: Path, **overrides) -> str:
    values = dict(
        model_name_or_path=str(models["policy"]), reward_model_name_or_path=str(models["rm"]),
        dataset_name=str(models["data"]), test_offset=QUICK_TEST_OFFSET, output_dir="unused", num_iterations=100,
        prompts_per_iteration=12, num_samples=4, max_new_tokens=10, heldout_prompts=12, max_length=128,
        per_device_train_batch_size=8, report_to="none", progress=False, disable_tqdm=True, offload_models=False,
    )  # fmt: skip
    path.write_text(yaml.safe_dump(values | overrides))
    return str(path)


def _raft_child(compare: subprocess.Popen, run_dir: Path, log: Path, seconds: float = 300) -> psutil.Process:
    """The RAFT process of ``compare`` once it holds its run folder's lock (it is past its start-up then)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if compare.poll() is not None:
            pytest.fail(f"compare ended (exit {compare.returncode}) before its RAFT run started:\n{log.read_text()}")
        lock = run_dir / lifetime.LOCK_FILE
        words = lock.read_text().split() if lock.is_file() else []
        if len(words) > 1 and words[0] == "pid" and words[1].rstrip(",").isdigit():
            pid = int(words[1].rstrip(","))
            if pid in {p.pid for p in psutil.Process(compare.pid).children(recursive=True)}:
                return psutil.Process(pid)
        time.sleep(0.2)
    pytest.fail(f"no RAFT run of compare held {run_dir} within {seconds:.0f} s:\n{log.read_text()}")


def _kill_and_check_family(compare: subprocess.Popen, family: list[psutil.Process]) -> None:
    """kill -9 the comparison; every process it started (the RAFT run) is gone within a few seconds."""
    family += psutil.Process(compare.pid).children(recursive=True)
    assert family
    compare.kill()
    compare.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(lifetime.alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p.cmdline() for p in family if lifetime.alive(p)]
    assert not left, f"still running 10 s after kill -9 of compare: {left}"


def test_killing_compare_kills_its_raft_run_and_a_rerun_is_not_refused(quick_models, tmp_path):
    """The RAFT run would take many minutes (100 iterations): gone within seconds of kill -9 means killed."""
    sft = _arm(quick_models, tmp_path / "sft.yaml")
    dpo = _arm(quick_models, tmp_path / "dpo.yaml", update="dpo", learning_rate=2e-4)
    out = tmp_path / "cmp"
    cmd = [sys.executable, "recipes/compare.py", "--sft_config", sft, "--dpo_config", dpo, "--seeds", "0"]
    cmd += ["--launcher", "python", "--output_dir", str(out)]
    started, family = [], []
    try:
        for attempt in ("first", "re-run"):
            log = tmp_path / f"compare_{attempt}.log"
            with open(log, "w") as f:
                started.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT))
            child = _raft_child(started[-1], out / "sft_seed0", log)  # the re-run's too: no stale lock refused it
            assert "recipes/raft.py" in " ".join(child.cmdline())
            _kill_and_check_family(started[-1], family)
    finally:  # nothing left running, whatever failed
        for proc in started:
            if proc.poll() is None:
                family += psutil.Process(proc.pid).children(recursive=True)
                proc.kill()
                proc.wait()
        for p in family:
            if lifetime.alive(p):
                p.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the boot-time clock of /proc/stat is Linux's")
def test_a_clock_step_does_not_make_a_live_supervisor_look_gone(monkeypatch):
    """A RAFT run killed itself at its end in CI ("the process that started this run is gone") while its supervisor
    ran: the wall-clock start time psutil derives from /proc/stat's btime moves when the system clock is adjusted.
    Step that clock by 2 s: the supervisor must still count as alive, and a dead child must not."""
    import psutil._pslinux as pslinux

    parent = psutil.Process(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    proc = psutil.Process(child.pid)
    started, booted = parent.create_time(), pslinux.boot_time()
    monkeypatch.setattr(pslinux, "boot_time", lambda: booted + 2.0)
    assert psutil.Process(os.getpid()).create_time() - started > 1.9  # what the watchdog used to compare
    assert lifetime.alive(parent)
    child.wait()
    assert not lifetime.alive(proc)
