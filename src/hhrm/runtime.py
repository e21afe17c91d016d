"""Device-aware defaults shared by every stage's config.

TRL's configs are GPU-minded: ``bf16`` defaults to True even on a CPU, where bf16 autocast is
hundreds of times slower than fp32 matmuls. hhrm's configs leave ``bf16`` unset by default and pick
it from the device: bf16 on a GPU that supports it, fp32 elsewhere. An explicit value always wins.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

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


@dataclass
class StageConfigMixin:
    """Put first in a TRL config's bases: what every hhrm stage adds to TRL's config.

    * ``bf16=None`` is resolved from the device before TRL sees it (TRL's default is True even on a CPU);
    * on a machine without an accelerator, ``use_cpu`` (so several processes initialise gloo);
    * ``overwrite_output_dir``: a folder that holds a model is only replaced when asked (``hhrm.outputs``);
    * ``resume_from_checkpoint: true`` means the latest checkpoint in ``output_dir``, as in TRL's scripts
      (transformers parses it as a path string).
    """

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "SFT/RM: replace the model already in output_dir (refused otherwise). RAFT resumes instead."
        },
    )

    def __post_init__(self) -> None:
        if getattr(self, "bf16", None) is None and not getattr(self, "fp16", False):
            self.bf16 = bf16_supported()
            if not self.bf16:
                logger.info("no bf16-capable GPU: training in fp32 (set --bf16 true to force)")
        if not has_accelerator():
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


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def setup_logging(level: int = logging.INFO) -> None:
    """Library logs at INFO on the main process, WARNING elsewhere."""
    logging.basicConfig(
        level=level if is_main_process() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
