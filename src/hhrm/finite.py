"""The one home of the non-finite rule: a NaN or infinite number is never a setting, and never a trained model.

* Settings: :func:`check_finite_settings` refuses, when a config is parsed, every float field (or float in a list
  field) that is NaN or +-inf (``--beta inf`` passes ``beta > 0``; ``--learning_rate nan`` passes every comparison).
* Trained models: :func:`check_trained` runs after ``trainer.train()`` and before anything is saved or marked done;
  a loss or a weight that went non-finite stops the stage in one line naming the settings that likely caused it,
  so a NaN model is never exported nor resumed past.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class NonFiniteTraining(ValueError):
    """A stage trained to a non-finite loss or weights (a ``ValueError``: recipes print it as one line, exit 2)."""


def non_finite_settings(config: Any) -> list[str]:
    """``name=value`` of each field of the dataclass ``config`` that is (or holds) a NaN or infinite float."""
    bad = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            bad.append(f"{f.name}={value}")
    return bad


def check_finite_settings(config: Any) -> None:
    """Refuse, in one ``ValueError`` naming every such field, a config with NaN or infinite numeric settings."""
    bad = non_finite_settings(config)
    if bad:
        raise ValueError(f"{', '.join(bad)}: numeric settings must be finite numbers (not nan or inf)")


def non_finite_flags(model: Any, device: Any = None) -> Any:
    """One flag per parameter tensor of ``model``: 1 where what this process holds has a NaN or inf, else 0.

    Under ZeRO-3 a parameter's local shard is ``ds_tensor`` (the parameter itself is empty); a DTensor (FSDP2)
    is checked through its local shard. Per tensor one ``isfinite().all()``: no copy of the model.
    """
    import torch

    flags = []
    for param in model.parameters():
        local = getattr(param, "ds_tensor", None)
        if local is None:
            local = param.to_local() if hasattr(param, "to_local") else param
        flags.append((~torch.isfinite(local.detach()).all()).to(device or "cpu"))
    return torch.stack(flags).to(torch.int32) if flags else torch.zeros(0, dtype=torch.int32, device=device)


def check_trained(
    trainer: Any, train_output: Any, where: str, settings: dict[str, float], what: str = "the model"
) -> None:
    """After ``train_output = trainer.train()``: stop, on every process, if the loss or a weight is non-finite.

    ``where`` names the stage (``"SFT"``, ``"iteration 0: the dpo update"``), ``settings`` the likely causes with
    their values (``{"learning_rate": 1e30}``), ``what`` the model that is therefore not saved. With a process
    group up the processes agree (a max over their flags), so a NaN in one rank's shard stops every rank.
    """
    import torch

    device = getattr(getattr(trainer, "accelerator", None), "device", None)
    loss = getattr(train_output, "training_loss", None)
    flags = non_finite_flags(trainer.model, device)
    loss_bad = torch.tensor([int(loss is not None and not math.isfinite(loss))], dtype=torch.int32, device=device)
    flags = torch.cat([flags, loss_bad])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    bad, total = int(flags[:-1].sum()), len(flags) - 1
    if not bad and not flags[-1]:
        return
    lower = " or ".join(f"{name}={value:g}" for name, value in settings.items())
    loss_text = f"{loss:.4g}" if isinstance(loss, float) else str(loss)
    raise NonFiniteTraining(
        f"{where} trained to non-finite values (NaN/inf in {bad} of {total} weight tensors, loss {loss_text}); "
        f"{what} was not saved; lower {lower}"
    )
