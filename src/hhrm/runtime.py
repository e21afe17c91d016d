"""Device-aware defaults shared by every stage's config.

TRL's configs are GPU-minded: ``bf16`` defaults to True even on a CPU, where bf16 autocast is
hundreds of times slower than fp32 matmuls. hhrm's configs leave ``bf16`` unset by default and pick
it from the device: bf16 on a GPU that supports it, fp32 elsewhere. An explicit value always wins.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hhrm.finite import check_finite_settings

logger = logging.getLogger(__name__)


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def torch_dtype(bf16: bool | None = None) -> torch.dtype:
    """The one precision rule: bf16 when asked (or, unset, on a bf16-capable GPU), fp32 otherwise.

    Stage configs resolve ``bf16`` with it when parsed; models loaded outside a trainer (the reward
    scorer, the evaluation) take the resulting dtype from the caller's config.
    """
    if bf16 is None:
        bf16 = bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available())


def deepspeed_on_cpu() -> bool:
    """A DeepSpeed launch (``accelerate launch`` with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED) on a machine
    without an accelerator: DeepSpeed's CPU accelerator, which talks over gloo when oneCCL is not installed."""
    return not has_accelerator() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_fsdp_device() -> None:
    """Refuse an FSDP launch (``accelerate launch`` with an FSDP config sets ACCELERATE_USE_FSDP) without a GPU:
    accelerate 1.16 applies FSDP only to GPU-like processes (``AcceleratorState.__init__`` sets DistributedType.FSDP
    only in its MULTI_GPU/MULTI_XPU/... branch, which lists no MULTI_CPU), so on a CPU the run would silently train
    DDP. tests/test_fsdp_cpu.py checks that gate and shards, steps and exports the config's way on a CPU."""
    if not has_accelerator() and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError(
            "FSDP needs a GPU: accelerate applies FSDP only to GPU processes, and on this CPU the run would train "
            "plain DDP instead; launch with accelerate_configs/deepspeed_zero3.yaml (DS_ACCELERATOR=cpu) for "
            "sharded training on a CPU, or multi_cpu.yaml for DDP"
        )


@contextmanager
def whole_models() -> Iterator[None]:
    """Models loaded inside are whole on this process even under a ZeRO-3 launch, and their ``generate`` does not
    sync per token across ranks. Under ZeRO-3 transformers' ``from_pretrained`` partitions a new model over every
    rank (``deepspeed.zero.Init``): one rank loading alone (an evaluation on the main process) waits forever."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # what the public is_deepspeed_zero3_enabled() reads
    config = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


@dataclass
class StageConfigMixin:
    """Put first in a TRL config's bases: what every hhrm stage adds to TRL's config.

    * ``bf16=None`` is resolved from the device before TRL sees it (TRL's default is True even on a CPU);
    * ``report_to`` defaults to TensorBoard (TRL's is none): a run of hours shows its curves;
    * on a machine without an accelerator, ``use_cpu`` (so several processes initialise gloo); a DeepSpeed launch
      keeps DeepSpeed over gloo; an FSDP launch is refused (:func:`check_fsdp_device`);
    * ``overwrite_output_dir``: a folder that holds a model is only replaced when asked (``hhrm.outputs``);
    * ``resume_from_checkpoint: true`` means the latest checkpoint in ``output_dir``, as in TRL's scripts
      (transformers parses it as a path string);
    * a NaN or infinite numeric setting is refused (:func:`hhrm.finite.check_finite_settings`).
    """

    report_to: None | str | list[str] = field(
        default="tensorboard",
        metadata={
            "help": "Where the trainer logs: tensorboard (default: event files under <output_dir>/runs; watch with "
            "`tensorboard --logdir <output_dir>`), wandb, mlflow, ... or none."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "SFT/RM: replace the model already in output_dir (refused otherwise). RAFT resumes instead."
        },
    )

    def __post_init__(self) -> None:
        check_finite_settings(self)  # --beta inf / --learning_rate nan pass every range check, then train to NaN
        check_fsdp_device()
        if getattr(self, "bf16", None) is None and not getattr(self, "fp16", False):
            self.bf16 = bf16_supported()
            if not self.bf16:
                logger.info("no bf16-capable GPU: training in fp32 (set --bf16 true to force)")
        if deepspeed_on_cpu():
            # Not use_cpu: under cpu=True accelerate drops DeepSpeed and trains plain DDP. Without an accelerator
            # accelerate names no backend, and every rank would see itself as rank 0 of 1: gloo, named here.
            self.ddp_backend = self.ddp_backend or "gloo"
            self.dataloader_pin_memory = False
        elif not has_accelerator():
            # Trainer then initialises gloo when launched with several processes (without it each
            # process would train alone as rank 0); and there is nothing to pin memory to.
            self.use_cpu = True
            self.dataloader_pin_memory = False
        if getattr(self, "num_train_epochs", 1) <= 0 and getattr(self, "max_steps", -1) <= 0:
            # Trainer would run zero steps and the stage would export its starting model as trained.
            raise ValueError(f"num_train_epochs={self.num_train_epochs}: must be > 0 (or set max_steps > 0)")
        resume = getattr(self, "resume_from_checkpoint", None)
        if isinstance(resume, str) and resume.lower() in ("true", "false"):
            self.resume_from_checkpoint = True if resume.lower() == "true" else None
        super().__post_init__()


def process_state(args: Any):
    """accelerate's ``PartialState`` with the collective timeout of ``args.ddp_timeout`` (seconds).

    The trainers apply ``ddp_timeout`` to their own process group; code that synchronises ranks outside
    a trainer (RAFT's gathers and barriers) starts the group here, so a frozen rank fails the run after
    that many seconds rather than gloo's 30 minutes.
    """
    from datetime import timedelta

    from accelerate import PartialState

    timeout = timedelta(seconds=args.ddp_timeout)
    if deepspeed_on_cpu():  # as in StageConfigMixin: cpu=True would drop DeepSpeed, no backend would mean 1 process
        return PartialState(backend="gloo", timeout=timeout)
    # cpu=True without an accelerator: several processes then form a gloo group instead of each running alone.
    return PartialState(cpu=not has_accelerator(), timeout=timeout)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def setup_logging(level: int = logging.INFO) -> None:
    """Library logs at INFO on the main process, WARNING elsewhere."""
    logging.basicConfig(
        level=level if is_main_process() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# hhrm's own checks raise these, with a message that names the setting or file and the fix.
REFUSALS = (ValueError, FileNotFoundError, ConnectionError)
_PACKAGE_DIR = Path(__file__).resolve().parent


def raised_by_hhrm(exc: BaseException) -> bool:
    """Whether ``exc`` was raised in hhrm's own code (a deliberate check), not inside torch/transformers/trl.

    Own code: the ``hhrm`` package and the script being run (a recipe: every launcher runs it as ``__main__``). What
    counts is the innermost frame of the traceback, the one that raised.
    """
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    if script and path == Path(script).resolve():
        return True
    return path.is_relative_to(_PACKAGE_DIR)


@contextmanager
def refusals_in_one_line() -> Iterator[None]:
    """Around a recipe's parsing and ``main``: a refusal is one line on stderr and exit code 2.

    A ``ValueError`` / ``FileNotFoundError`` / ``ConnectionError`` raised by hhrm's own code prints
    ``hhrm: error: <message>`` (on the main process only; every rank exits 2), like argparse's usage errors.
    Anything else, and those types raised inside a library (a bug, not a refusal), keeps its traceback.
    """
    try:
        yield
    except REFUSALS as exc:
        if not raised_by_hhrm(exc):
            raise
        if is_main_process():
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"hhrm: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
