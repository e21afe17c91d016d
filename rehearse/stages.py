"""The stages of the card's recipes, each a few bounded steps in a fresh process (its own peak memory, freed after).

Random token ids stand in for text (the weights are random too): timing and memory depend on shapes only. SFT's
packed chunks are full rows of ``max_length`` tokens; RM pairs and RAFT's fine-tune rows are taken at their recipe's
``max_length`` (the worst case); RAFT generates exactly ``max_new_tokens`` per sequence (EOS suppressed).
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .models import Arch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.float32}
COMPUTE = {"fp32": "fp32", "bf16": "bf16", "bf16-mixed": "bf16"}  # the dtype the matmuls run in
BYTES = {"fp32": 4, "bf16": 2}


@dataclass
class Stage:
    """One stage of one recipe, with the shapes it runs at here."""

    id: str  # open_llama_3b/sft:train
    recipe: str
    kind: str  # train | rm | generate | score | finetune
    arch: Arch
    seqcls: bool
    precision: str  # fp32 | bf16 | bf16-mixed (fp32 weights, bf16 autocast)
    rows: int = 0  # training: rows (RM: pairs) per step
    seq: int = 0  # training / scoring: tokens per row
    prompts: int = 0  # generate: prompts per call, each sampled k times
    k: int = 1
    prompt_len: int = 0
    new_tokens: int = 0
    checkpointing: bool = False
    steps: int = 1  # timed steps (or calls)
    warmup: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"arch": self.arch.name}

    def shaped(self, prompt_len: int, new_tokens: int) -> Stage:
        self.prompt_len, self.new_tokens = prompt_len, new_tokens
        return self


def plan(key: str, recipe: dict[str, Any], policy: Arch, rm: Arch | None, scale: str, device: str) -> list[Stage]:
    """The stages of recipe ``key`` (``open_llama_3b/sft``) at ``scale`` on ``device``."""
    cuda, full = device.startswith("cuda"), scale == "full"
    train_prec = "bf16-mixed" if cuda else "fp32"  # hhrm trains in fp32 on a CPU
    infer_prec = "bf16" if (cuda or full) else "fp32"
    ckpt = bool(recipe.get("activation_checkpointing", False))
    bsz = int(recipe.get("per_device_train_batch_size", 1))
    seq = int(recipe.get("max_length", 1024))
    # CPU at full size: a few tokens (a bf16 step of a 3B model on 2 cores); tiny: short rows
    if full and cuda:
        steps = dict(steps=2, warmup=1)
    elif full:
        bsz, seq, steps = 1, 16, dict(steps=1, warmup=0)
    else:
        seq, steps = min(seq, 64), dict(steps=1, warmup=1)
    base = dict(recipe=key, precision=train_prec, checkpointing=ckpt, **steps)
    if "reward_model_name_or_path" not in recipe:
        kind = "rm" if key.endswith("rm") else "train"
        return [Stage(id=f"{key}:{kind}", kind=kind, arch=policy, seqcls=kind == "rm", rows=bsz, seq=seq, **base)]
    k = int(recipe.get("num_samples", 8))
    prompts, plen, new = int(recipe.get("generation_batch_size", 16)), int(recipe.get("max_prompt_tokens", 512)), 128
    new = int(recipe.get("max_new_tokens", new))
    texts = int(recipe.get("reward_batch_size", 16))
    if full and not cuda:
        prompts, k, plen, new, texts = 1, 1, 4, 2, 1
    elif not full:
        prompts, plen, new, texts = 2, 8, 4, 4
    inf = base | dict(precision=infer_prec, checkpointing=False)
    return [
        Stage(id=f"{key}:generate", kind="generate", arch=policy, seqcls=False, prompts=prompts, k=k, **inf).shaped(
            plen, new
        ),
        Stage(id=f"{key}:score", kind="score", arch=rm, seqcls=True, rows=texts, seq=plen + new if cuda else 8, **inf),
        Stage(id=f"{key}:finetune", kind="finetune", arch=policy, seqcls=False, rows=bsz, seq=seq, **base),
    ]


# --------------------------------------------------------------------------------------------
# Measuring


def peak_matmul_flops(device: str, precision: str, seconds: float = 1.0) -> float:
    """FLOP/s of an n x n x n matmul at ``precision``'s compute dtype: the best of a few timed rounds."""
    dtype = DTYPES[COMPUTE[precision]]
    n = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2.0 * n**3 / (time.perf_counter() - start))
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kb(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _memory_gb(device: str) -> float:
    """The peak since the last reset: CUDA max_memory_allocated, else the process's peak RSS (VmHWM)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    kb = _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024 / 1e9


# --------------------------------------------------------------------------------------------
# Running (in a child process)


def run(stage: Stage, device: str, threads: int, queue) -> None:
    """Build the stage's model, run its steps, put its measurements on ``queue`` (an error string on failure)."""
    try:
        if not device.startswith("cuda"):
            torch.set_num_threads(threads)
        queue.put(_run(stage, device))
    except BaseException as exc:  # the parent reports it and goes on with the next stage
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _run(stage: Stage, device: str) -> dict[str, Any]:
    from .models import build

    _reset_peak(device)
    baseline = _status_kb("VmRSS") * 1024 / 1e9 if not device.startswith("cuda") else 0.0
    start = time.perf_counter()
    model = build(stage.arch, stage.seqcls, DTYPES[stage.precision], device)
    built = time.perf_counter() - start
    work = {"train": _train, "finetune": _train, "rm": _train, "generate": _generate, "score": _score}[stage.kind]
    gen = torch.Generator().manual_seed(0)
    for _ in range(stage.warmup):
        work(stage, model, device, gen)
    _sync(device)
    start = time.perf_counter()
    units = [work(stage, model, device, gen) for _ in range(stage.steps)]
    _sync(device)
    seconds = time.perf_counter() - start
    total = {k: sum(u[k] for u in units) for k in units[0]}
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {
        "seconds": seconds,
        "matmul_params": matmul,
        "build_seconds": round(built, 1),
        "peak_gb": round(_memory_gb(device) - baseline, 3),
        "baseline_rss_gb": round(baseline, 3),
        **total,
    }


def _ids(stage: Stage, rows: int, length: int, gen: torch.Generator, device: str) -> torch.Tensor:
    # ids from 3 up: never pad (0), BOS (1) or EOS (2) of the Llamas; GPT-Neo's EOS is the last id
    return torch.randint(3, stage.arch.vocab - 1, (rows, length), generator=gen).to(device)


def _autocast(stage: Stage, device: str):
    enabled = stage.precision == "bf16-mixed"
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def _train(stage: Stage, model, device: str, gen: torch.Generator) -> dict[str, float]:
    """One optimizer step (AdamW) on a full micro-batch: causal LM loss, or the RM's pairwise loss."""
    if not hasattr(model, "_rehearse_opt"):
        model.train()
        model.config.use_cache = False
        if stage.checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model._rehearse_opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = 2 * stage.rows if stage.kind == "rm" else stage.rows  # RM: chosen and rejected in one forward
    ids = _ids(stage, rows, stage.seq, gen, device)
    with _autocast(stage, device):
        if stage.kind == "rm":
            rewards = model(input_ids=ids).logits[:, 0].float()
            loss = -torch.nn.functional.logsigmoid(rewards[: stage.rows] - rewards[stage.rows :]).mean()
        else:
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model._rehearse_opt.step()
    model._rehearse_opt.zero_grad(set_to_none=True)
    return {"tokens": rows * stage.seq, "pairs": stage.rows if stage.kind == "rm" else 0}


@torch.no_grad()
def _generate(stage: Stage, model, device: str, gen: torch.Generator) -> dict[str, float]:
    """One RAFT generate call: ``prompts`` prompts x K samples of exactly ``new_tokens`` tokens (recipe sampling)."""
    from transformers import GenerationConfig

    model.eval()
    cfg = model.config
    eos = cfg.eos_token_id
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        num_return_sequences=stage.k,
        max_new_tokens=stage.new_tokens,
        min_new_tokens=stage.new_tokens,
        pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else eos,
        eos_token_id=eos,
    )
    ids = _ids(stage, stage.prompts, stage.prompt_len, gen, device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    generated = out.shape[0] * (out.shape[1] - ids.shape[1])
    return {"generated_tokens": generated, "tokens": generated + out.shape[0] * ids.shape[1]}


@torch.no_grad()
def _score(stage: Stage, model, device: str, gen: torch.Generator) -> dict[str, float]:
    """One reward-model forward over ``rows`` texts of ``seq`` tokens (a RewardScorer batch)."""
    model.eval()
    ids = _ids(stage, stage.rows, stage.seq, gen, device)
    rewards = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, 0]
    assert torch.isfinite(rewards.float()).all(), "non-finite rewards"
    return {"texts": stage.rows, "tokens": stage.rows * stage.seq}


def available_gb(device: str) -> float:
    """Memory a stage may use: the GPU's total, or the memory the OS reports available now."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory / 1e9
    kb = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                kb = int(line.split()[1])
    except OSError:
        pass
    if kb is None:
        import psutil

        return psutil.virtual_memory().available / 1e9
    return kb * 1024 / 1e9


def gpu_name(device: str) -> str | None:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
