"""Multi-node launching: the configs, the Slurm script's command lines, and two "machines" on this host.

The loopback tests start two ``accelerate launch`` processes with machine ranks 0 and 1 (one CPU process each,
gloo over 127.0.0.1), which is what two nodes of a cluster run, minus the network between them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hhrm.reporting import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "accelerate_configs" / "multi_node_cpu.yaml"
GPU_CONFIG = ROOT / "accelerate_configs" / "multi_node.yaml"
SLURM_SCRIPT = ROOT / "scripts" / "slurm" / "launch.slurm"
TEST_OFFSET = 100


def test_multi_node_configs_describe_two_machines():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    for path, processes in ((GPU_CONFIG, 16), (CPU_CONFIG, 2)):
        cfg = load_config_from_file(str(path))
        assert cfg.distributed_type == DistributedType.MULTI_GPU, path.name
        assert (cfg.num_machines, cfg.num_processes, cfg.machine_rank) == (2, processes, 0), path.name
    assert load_config_from_file(str(GPU_CONFIG)).main_process_ip is None  # each job names its first node


# --------------------------------------------------------------------------------------------
# The Slurm script, run with a fake srun/scontrol/accelerate that record what each node would run

FAKE_SRUN = """#!/bin/bash
# fake srun: skip its options, run the command once per node with that node's SLURM_PROCID
echo "$@" > "$FAKE_OUT/srun.args"
while [[ "$1" == --* ]]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_PROCID=$i SLURM_NODEID=$i "$@" || exit $?; done
"""
FAKE_SCONTROL = """#!/bin/bash
[[ "$1 $2 $3" == "show hostnames gpu-[07-08]" ]] || { echo "unexpected: $*" >&2; exit 1; }
# the second host comes late, as from a long node list: a reader that stops after one line makes this SIGPIPE
echo gpu-07; sleep 0.3; echo gpu-08
"""
FAKE_ACCELERATE = f"""#!{sys.executable}
import json, os, sys
with open(os.path.join(os.environ["FAKE_OUT"], "node" + os.environ["SLURM_PROCID"] + ".json"), "w") as f:
    json.dump(sys.argv[1:], f)
"""


def _fake_slurm(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("fake-accelerate", FAKE_ACCELERATE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    slurm = {
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-[07-08]",
        "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_GPUS_ON_NODE": "4",
        "ACCELERATE": str(bin_dir / "fake-accelerate"),
        "FAKE_OUT": str(tmp_path),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    return subprocess.run(
        ["bash", str(SLURM_SCRIPT), *args],
        env=os.environ | slurm | env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_slurm_script_starts_one_accelerate_launch_per_node(tmp_path):
    proc = _fake_slurm(tmp_path, "raft", "recipes/configs/tiny/raft.yaml", "--seed", "3", "--run_name", "a b")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--ntasks-per-node=1" in (tmp_path / "srun.args").read_text()
    for rank in (0, 1):
        argv = json.loads((tmp_path / f"node{rank}.json").read_text())
        assert argv[:3] == ["launch", "--machine_rank", str(rank)]
        opts = dict(zip(argv[3:-7:2], argv[4:-7:2]))
        assert opts == {
            "--config_file": "accelerate_configs/multi_node.yaml",
            "--num_machines": "2",
            "--num_processes": "8",  # 2 nodes x SLURM_GPUS_ON_NODE
            "--main_process_ip": "gpu-07",  # the allocation's first host
            "--main_process_port": "29500",
            "--rdzv_conf": "timeout=900",
            "--max_restarts": "0",
        }
        assert argv[-7:] == ["recipes/raft.py", "--config", "recipes/configs/tiny/raft.yaml"] + [
            "--seed",
            "3",
            "--run_name",
            "a b",  # arguments reach the recipe unsplit
        ]


def test_slurm_script_takes_the_accelerate_config_and_sizes_from_the_environment(tmp_path):
    env = {"ACCEL": "accelerate_configs/deepspeed_zero3.yaml", "GPUS_PER_NODE": "2", "MASTER_PORT": "6000"}
    proc = _fake_slurm(tmp_path, "sft", "recipes/configs/tiny/sft.yaml", **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = json.loads((tmp_path / "node1.json").read_text())
    for flag, value in (("--config_file", env["ACCEL"]), ("--num_processes", "4"), ("--main_process_port", "6000")):
        assert argv[argv.index(flag) + 1] == value
    assert argv[-3:] == ["recipes/sft.py", "--config", "recipes/configs/tiny/sft.yaml"]


def test_slurm_script_refuses_a_bad_stage_or_a_missing_file(tmp_path):
    proc = _fake_slurm(tmp_path, "dpo", "recipes/configs/tiny/sft.yaml")
    assert proc.returncode == 2 and "unknown stage 'dpo'" in proc.stderr
    proc = _fake_slurm(tmp_path, "rm", "recipes/configs/tiny/nope.yaml")
    assert proc.returncode == 2 and "no such file: recipes/configs/tiny/nope.yaml" in proc.stderr
    assert not list(tmp_path.glob("node*.json"))


# --------------------------------------------------------------------------------------------
# Two machines on this host: machine ranks 0 and 1 over loopback, one gloo process each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_launch(machine_rank: int, port: int, script: str, *args: str) -> list[str]:
    """What node ``machine_rank`` of a 2-node job runs (cf. scripts/slurm/launch.slurm), with 1 process per node."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_CONFIG),
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--machine_rank",
        str(machine_rank),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--rdzv_conf",
        "timeout=120",  # a machine whose partner never shows up gives up after 2 minutes
        script,
        *args,
    ]


def _stop(proc: subprocess.Popen) -> None:
    """End a launch this test started, by its ids: the agent's process group with SIGTERM (the agent passes it
    on to its worker, which torch starts in a session of its own), then SIGKILL for whatever is left."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(40)  # torch gives its workers 30 s to exit after SIGTERM
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def run_two_machines(tmp_path: Path, usual_seconds: float, script: str, *args: str) -> list[tuple[int, str]]:
    """Launch machines 0 and 1 side by side; ``[(exit code, output)]`` per machine.

    Bounded like conftest's ``run_process`` (10x the usual time, at least 30 minutes): when either launch fails,
    the other is given 20 s to end by itself, then both are stopped.
    """
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    logs = [tmp_path / f"machine{r}.log" for r in (0, 1)]
    procs = []
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as out:
                cmd = machine_launch(rank, port, script, *args)
                procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=ROOT,
                        env=env | {"HHRM_TEST_MACHINE": str(rank)},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        limit = max(10 * usual_seconds, 1800)
        start, failed_at = time.monotonic(), None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if failed_at is not None and now - failed_at > 20:
                break
            if now - start > limit:
                pytest.fail(
                    f"two-machine launch of {script} did not finish in {limit:.0f} s; it usually takes about "
                    f"{usual_seconds:.0f} s on 2 idle cores: a hang, or a machine far busier than that"
                )
            time.sleep(0.5)
    finally:
        for p in procs:
            _stop(p)
    return [(p.returncode, log.read_text()) for p, log in zip(procs, logs)]


def _assert_both_ok(results: list[tuple[int, str]]) -> None:
    for rank, (code, output) in enumerate(results):
        assert code == 0, f"machine {rank} exited {code}:\n{output[-4000:]}"


PROBE = """
import json, os, sys
from datetime import timedelta
from accelerate import PartialState
from accelerate.utils import gather_object
import torch

state = PartialState(cpu=True, timeout=timedelta(seconds=60))
info = {
    "machine": os.environ["HHRM_TEST_MACHINE"],
    "node_rank": os.environ["GROUP_RANK"],
    "local_rank": state.local_process_index,
    "rank": state.process_index,
    "world": state.num_processes,
    "backend": state.backend,
    "gathered": gather_object([state.process_index]),
}
with open(os.path.join(sys.argv[1], f"rank{state.process_index}.{os.getpid()}.json"), "w") as f:
    json.dump(info, f)
state.wait_for_everyone()  # leave the gloo group together: a rank exiting inside it can abort the other
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_each_machine_starts_one_worker_with_its_global_rank(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    _assert_both_ok(run_two_machines(tmp_path, 10, str(probe), str(tmp_path)))
    found = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(found) == 2  # one worker per launch, not num_processes per launch
    for rank, info in enumerate(found):
        assert info == {
            "machine": str(rank),  # the launch with --machine_rank r ran global rank r
            "node_rank": str(rank),
            "local_rank": 0,
            "rank": rank,
            "world": 2,
            "backend": "gloo",
            "gathered": [0, 1],  # the two machines talked
        }


@pytest.mark.slow
def test_sft_on_two_machines_trains_one_model(tiny, tmp_path):
    """The Trainer stages (SFT here; the RM trains through the same Trainer) see world size 2 and save once."""
    out = tmp_path / "sft"
    args = [
        "--config",
        str(ROOT / "recipes" / "configs" / "tiny" / "sft.yaml"),
        "--model_name_or_path",
        str(tiny["base"]),
        "--dataset_name",
        str(tiny["data"]),
        "--test_offset",
        str(TEST_OFFSET),
        "--max_steps",
        "4",
        "--max_length",
        "128",
        "--eval_rows",
        "16",
        "--gold_eval_prompts",
        "4",
        "--report_to",
        "none",
        "--output_dir",
        str(out),
        "--ddp_find_unused_parameters",
        "false",
    ]
    _assert_both_ok(run_two_machines(tmp_path, 40, "recipes/sft.py", *args))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors")) == ["model.safetensors"]


@pytest.fixture(scope="module")
def untrained_models(tiny, tmp_path_factory) -> dict[str, Path]:
    """The tiny base as policy and a reward model with its untrained head: RAFT runs, rewards are noise."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = tmp_path_factory.mktemp("mn_rm")
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    rm = AutoModelForSequenceClassification.from_pretrained(tiny["base"], num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    return {"policy": tiny["base"], "rm": rm_dir, "data": tiny["data"]}


@pytest.mark.slow
def test_raft_on_two_machines_splits_the_prompts_across_them(untrained_models, tmp_path):
    """One RAFT iteration on 2 machines x 1 process: every prompt generated and scored once, the policy saved once."""
    out = tmp_path / "raft"
    values = dict(
        model_name_or_path=untrained_models["policy"],
        reward_model_name_or_path=untrained_models["rm"],
        dataset_name=untrained_models["data"],
        test_offset=TEST_OFFSET,
        output_dir=out,
        num_iterations=1,
        prompts_per_iteration=21,
        num_samples=2,
        max_new_tokens=8,
        heldout_prompts=5,
        generation_batch_size=32,
        reward_batch_size=64,
        max_length=128,
        per_device_train_batch_size=4,
        num_train_epochs=1,
        seed=0,
        progress=False,
        disable_tqdm=True,
        offload_models="false",
        report_to="none",
        activation_checkpointing="false",
        filter_min_tokens=0,
    )
    argv = [x for k, v in values.items() for x in (f"--{k}", str(v))]
    _assert_both_ok(run_two_machines(tmp_path, 60, "recipes/raft.py", *argv))
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    d = out / "iter_000"
    drawn = [r["index"] for r in read_jsonl(d / "prompts.jsonl")]
    samples = read_jsonl(d / "samples.jsonl")
    assert len(drawn) == len(set(drawn)) == 21
    assert [r["index"] for r in samples] == drawn  # every drawn prompt exactly once, in order
    # shard(): rank r takes drawn[r::2], so rank 0 (machine 0) has 11 prompts and rank 1 (machine 1) 10
    assert [r["rank"] for r in samples] == [i % 2 for i in range(21)]
    assert sorted(r["index"] for r in read_jsonl(d / "scored.jsonl")) == sorted(drawn)
    assert [r["position"] for r in read_jsonl(d / "heldout_scored.jsonl")] == list(range(5))
    # written once, by global rank 0: the iteration's policy and the final model beside the run's files
    weights = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert weights == ["iter_000/policy/model.safetensors", "model.safetensors"]
    assert not list(out.rglob("*.tmp"))
