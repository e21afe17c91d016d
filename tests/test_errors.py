"""A refusal is one line: `hhrm: error: <message>` on stderr, exit code 2, no traceback, no model file touched.

The recipes run as a user runs them (subprocesses from the repository root); every case here refuses
before any model is loaded, so each costs only the imports.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from hhrm import outputs
from hhrm.runtime import raised_by_hhrm, refusals_in_one_line

from conftest import run_process

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs" / "tiny"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def _env() -> dict[str, str]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return env


def _files(*folders: Path) -> dict[str, tuple[int, int]]:
    """``path -> (size, mtime_ns)`` of every file under ``folders`` (a missing folder has none)."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for f in folders
        if f.exists()
        for p in f.rglob("*")
        if p.is_file()
    }


def _assert_refused(proc, setting: str, code: int = 2) -> None:
    """Exit ``code``; stderr ends with one `hhrm: error:` line naming ``setting``; no traceback anywhere."""
    report = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == code, report
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr, report
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("hhrm: error: ") and setting in last, report
    assert proc.stderr.count("hhrm: error:") == 1, report


def _recipe(name: str, *args: str) -> list[str]:
    return [sys.executable, f"recipes/{name}.py", *args]


def test_sft_into_a_folder_holding_a_model(tiny, tmp_path):
    out = tmp_path / "sft_done"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"a finished model")
    before = _files(out, tiny["base"])
    cmd = _recipe("sft", "--config", str(CONFIGS / "sft.yaml"), "--model_name_or_path", str(tiny["base"]))
    cmd += ["--dataset_name", str(tiny["data"]), "--output_dir", str(out)]
    proc = run_process(cmd, 10, cwd=ROOT, env=_env())
    _assert_refused(proc, f"output_dir={str(out)!r}")
    assert "--overwrite_output_dir true" in proc.stderr
    assert _files(out, tiny["base"]) == before


def test_rm_from_a_model_path_that_does_not_exist(tiny, tmp_path):
    out = tmp_path / "rm"
    cmd = _recipe("rm", "--config", str(CONFIGS / "rm.yaml"), "--model_name_or_path", "models/nope")
    cmd += ["--dataset_name", str(tiny["data"]), "--output_dir", str(out)]
    proc = run_process(cmd, 10, cwd=ROOT, env=_env())
    _assert_refused(proc, "model_name_or_path='models/nope'")
    assert not _files(out)


def test_raft_with_a_causal_lm_as_reward_model(tiny, tmp_path):
    out = tmp_path / "raft"
    before = _files(tiny["base"])
    cmd = _recipe("raft", "--config", str(CONFIGS / "raft.yaml"), "--model_name_or_path", str(tiny["base"]))
    cmd += ["--reward_model_name_or_path", str(tiny["base"]), "--dataset_name", str(tiny["data"])]
    cmd += [
        "--test_offset",
        "100",
        "--prompts_per_iteration",
        "16",
        "--heldout_prompts",
        "8",
        "--output_dir",
        str(out),
    ]
    proc = run_process(cmd, 15, cwd=ROOT, env=_env())
    _assert_refused(proc, f"reward_model_name_or_path={str(tiny['base'])!r}")
    assert _files(tiny["base"]) == before and not _files(out)


def test_eval_rm_of_a_missing_folder(tiny, tmp_path):
    out = tmp_path / "eval"
    cmd = _recipe("eval_rm", "--config", str(CONFIGS / "rm.yaml"), "--reward_model", "/no/such")
    cmd += ["--dataset_name", str(tiny["data"]), "--eval_output_dir", str(out), "--skip_gold", "true"]
    proc = run_process(cmd, 10, cwd=ROOT, env=_env())
    _assert_refused(proc, "reward_model='/no/such'")
    assert not _files(out)


def test_accelerate_launch_quiet_as_make_runs_it(tiny, tmp_path):
    """`make sft` launches with `accelerate launch --quiet`: the same one line, then accelerate's exit code 1
    (without `--quiet` accelerate adds its own CalledProcessError traceback; make then says `Error 1`, exit 2)."""
    out = tmp_path / "sft_done"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"a finished model")
    before = _files(out)
    cmd = [ACCELERATE, "launch", "--quiet", "--config_file", "accelerate_configs/cpu.yaml"]
    cmd += ["--num_cpu_threads_per_process", "1", "recipes/sft.py", "--config", str(CONFIGS / "sft.yaml")]
    cmd += ["--model_name_or_path", str(tiny["base"]), "--dataset_name", str(tiny["data"]), "--output_dir", str(out)]
    proc = run_process(cmd, 15, cwd=ROOT, env=_env())
    _assert_refused(proc, f"output_dir={str(out)!r}", code=1)
    assert _files(out) == before


def _hub_unreachable_env() -> dict[str, str]:
    """No offline setting, and a hub endpoint on a 127.0.0.1 port where nothing listens: the hub cannot be reached
    (as on a machine without network, deterministically, wherever the tests run)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = _env() | {"HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    return env


@pytest.mark.parametrize("setting", ["model_name_or_path", "dataset_name"])
def test_a_missing_relative_path_while_the_hub_cannot_be_reached(tiny, tmp_path, setting):
    """`models/nope` and `out/no_such_dir` look like hub ids: without the hub they were tried there (a minute of
    retries, then a traceback). Now: at once, one line saying there is no such path and no reachable hub id."""
    out = tmp_path / "rm"
    model, dataset = str(tiny["base"]), str(tiny["data"])
    if setting == "model_name_or_path":
        model = "models/nope"
    else:
        dataset = "out/no_such_dir"
    cmd = _recipe("rm", "--config", str(CONFIGS / "rm.yaml"), "--model_name_or_path", model)
    cmd += ["--dataset_name", dataset, "--output_dir", str(out)]
    proc = run_process(cmd, 10, cwd=ROOT, env=_hub_unreachable_env())
    missing = ROOT / (model if setting == "model_name_or_path" else dataset)
    _assert_refused(proc, f"{setting}={str(missing.relative_to(ROOT))!r}: no such local")
    assert f"({missing}), and not a reachable hub id: the hub (http://127.0.0.1:" in proc.stderr
    assert not _files(out)


def test_a_truncated_weight_file_is_one_line(tiny, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(tiny["base"], folder)
    weights = folder / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 3])  # an interrupted copy
    out = tmp_path / "sft"
    cmd = _recipe("sft", "--config", str(CONFIGS / "sft.yaml"), "--model_name_or_path", str(folder))
    cmd += ["--dataset_name", str(tiny["data"]), "--output_dir", str(out)]
    proc = run_process(cmd, 10, cwd=ROOT, env=_env())
    sizes = f"({len(blob) // 3 / 1e6:.1f} MB of {len(blob) / 1e6:.1f} MB)"
    _assert_refused(proc, f"model_name_or_path={str(folder)!r}: model.safetensors is truncated {sizes}")
    assert "copy it again or retrain" in proc.stderr and not _files(out)


def test_compare_overrides_are_settings_of_the_raft_recipe_with_valid_values(tmp_path):
    """An unknown key or a value its parser cannot convert: one line when the comparison is parsed, not a
    traceback from the RAFT config's parser once it runs."""
    from hhrm.compare import CompareConfig

    out = tmp_path / "compare"
    cmd = _recipe("compare", "--overrides", "num_iterations=1", "foo=1", "--output_dir", str(out))
    proc = run_process(cmd, 10, cwd=ROOT, env=_env())
    _assert_refused(proc, "overrides: 'foo' is not a setting of the RAFT recipe")
    assert not out.exists()
    configs = dict(sft_config=str(CONFIGS / "raft.yaml"), dpo_config=str(CONFIGS / "raft_dpo.yaml"), launcher="python")
    for override, expected in [
        ("num_iteration=1", r"'num_iteration' is not a setting .*; did you mean 'num_iterations'"),
        ("num_iterations=abc", r"num_iterations='abc' is not a valid value \(invalid literal for int\(\)"),
        ("update=ppo", r"update='ppo': expected one of \['sft', 'dpo'\]"),
        ("bf16=maybe", r"bf16='maybe' is not a valid value \(Truthy value expected"),
    ]:
        with pytest.raises(ValueError, match=expected):
            CompareConfig(overrides=[override], **configs)
    ok = CompareConfig(overrides=["max-new-tokens=8", "--learning_rate=1e-5", "bf16=false"], **configs)
    assert ok.override_args() == ["--max_new_tokens", "8", "--learning_rate", "1e-5", "--bf16", "false"]


def test_makefile_launches_quietly():
    launch = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("LAUNCH ="))
    assert "accelerate launch --quiet " in launch


# --------------------------------------------------------------------------------------------
# The context manager itself, in process


def test_a_refusal_raised_by_hhrm_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("")
    with pytest.raises(SystemExit) as exit_info, refusals_in_one_line():
        outputs.check_output_dir(a_file, "sft")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"hhrm: error: output_dir={str(a_file)!r} is a file, not a folder: choose another output_dir\n"


def test_only_the_main_process_prints_but_every_rank_exits_2(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info, refusals_in_one_line():
        outputs.check_output_dir(a_file, "sft")
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""


def test_an_error_raised_inside_a_library_keeps_its_traceback(capsys):
    """A ValueError from json (or torch, transformers, trl) is a bug to debug, not a refusal."""
    with pytest.raises(json.JSONDecodeError) as error, refusals_in_one_line():
        json.loads("{")
    assert not raised_by_hhrm(error.value)
    assert capsys.readouterr().err == ""


def _raise_as_hhrm(exc: BaseException) -> None:
    """Raise ``exc`` from a frame whose file is in the hhrm package, as hhrm's own checks do."""
    import hhrm

    exec(compile("raise exc", str(Path(hhrm.__file__).parent / "a_check.py"), "exec"), {"exc": exc})


def test_a_message_over_several_lines_is_printed_on_one(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exit_info, refusals_in_one_line():
        _raise_as_hhrm(FileNotFoundError("data_files='x.jsonl': no such file;\n  give a local path"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "hhrm: error: data_files='x.jsonl': no such file; give a local path\n"


def test_other_code_and_other_types_propagate(capsys):
    with pytest.raises(ValueError, match="not hhrm's"), refusals_in_one_line():
        raise ValueError("not hhrm's: raised in the test file")
    with pytest.raises(RuntimeError, match="a bug"), refusals_in_one_line():
        _raise_as_hhrm(RuntimeError("a bug in hhrm, not a refusal"))
    assert capsys.readouterr().err == ""
