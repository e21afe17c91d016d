"""Batched sampling: many prompts x K samples per call, one path for every stage.

Prompts are sorted by length and left-padded, so a batch shares one KV cache with little padding;
``num_return_sequences=K`` expands each prompt inside ``generate``. A sequence stops at EOS or when
it starts a new ``###Human:`` turn, and the response is cut from the prompt by token position
(never by string replacement), then cut at the next turn marker.

:func:`generate_responses` is the Hugging Face path. Given an ``accelerator`` it generates through
``trl.models.utils.unwrap_model_for_generation``, which unwraps DDP/FSDP and gathers ZeRO-3 shards
(calling ``generate`` on a ZeRO-3-partitioned module is the classic RAFT failure). :class:`VLLMBackend`
is the optional vLLM path behind the same call shape (colocated, or a ``trl vllm-serve`` server that
receives each new policy's weights); vLLM is imported only when it is built. transformers' continuous
batching (``model.generate_batch``) was measured against this path and is not used: about a third of its
tokens/s on a CPU (``make bench``, ``gen_continuous_vs_static``; bench/README.md says why).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from transformers import GenerationConfig

from hhrm import formatting, modeling
from hhrm.finite import check_finite_settings


@dataclass
class SamplingArguments:
    """How responses are sampled (greedy when ``do_sample`` is False)."""

    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_at_turn_marker: bool = True

    def __post_init__(self) -> None:
        check_finite_settings(self)
        # The one place sampling settings are checked; the messages use the config fields' names.
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be > 0")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0 when sampling")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0")

    def generation_config(self, tokenizer, num_return_sequences: int) -> GenerationConfig:
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        if self.do_sample:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.stop_at_turn_marker:
            kwargs["stop_strings"] = [formatting.HUMAN]
        return GenerationConfig(**kwargs)


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    k: int = 1,
    sampling: SamplingArguments | None = None,
    batch_size: int = 32,
    progress: bool = False,
    *,
    accelerator=None,
    seed: int | None = None,
    stats: dict[str, Any] | None = None,
) -> list[list[str]]:
    """``k`` responses for each prompt, as ``responses[prompt_index][sample_index]``.

    ``batch_size`` counts prompts per ``generate`` call (so ``batch_size * k`` sequences).
    ``accelerator``: generate through TRL's unwrap context (needed for a ZeRO-3/FSDP-wrapped model).
    ``seed``: seeds torch's generator first, so the same inputs give the same samples.
    ``stats``: if given, receives ``generated_tokens`` (new tokens, EOS included, padding not) and ``seconds``.
    ``model`` may also be a :class:`VLLMBackend`, which takes the same arguments.
    """
    if isinstance(model, VLLMBackend):
        return model.generate(prompts, k, sampling, progress=progress, stats=stats)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token: set one (e.g. tokenizer.pad_token = '<pad>') before generating"
        )
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    start = time.perf_counter()
    sampling = sampling or SamplingArguments()
    config = sampling.generation_config(tokenizer, k)
    if seed is not None:
        torch.manual_seed(seed)
    # An empty list is valid (a rank with no prompts): it still enters the gather context below.
    ids = prompt_ids(tokenizer, prompts)
    out: list[list[str]] = [[] for _ in prompts]
    new_tokens = 0
    batches = length_sorted_batches(ids, batch_size, progress=f"generate ({k}/prompt)" if progress else None)
    with _whole_model(model, accelerator) as gen_model:
        device = next(gen_model.parameters()).device
        was_training = gen_model.training
        gen_model.eval()
        for batch in batches:
            input_ids, attention = left_padded([ids[i] for i in batch], tokenizer.pad_token_id)
            width = input_ids.shape[1]
            seqs = _generate(gen_model, tokenizer, input_ids.to(device), attention.to(device), config, k)
            completion = seqs[:, width:]  # the cut by token position: everything after the prompt
            new_tokens += int((completion != tokenizer.pad_token_id).sum())
            texts = decode_completions(tokenizer, [ids[batch[j // k]] for j in range(len(completion))], completion)
            for j, text in enumerate(texts):  # generate returns prompt-major order: row j belongs to batch[j // k]
                out[batch[j // k]].append(formatting.cut_at_next_turn(text) if sampling.stop_at_turn_marker else text)
        if was_training:
            gen_model.train()
    if stats is not None:
        stats.update(generated_tokens=new_tokens, seconds=time.perf_counter() - start)
    return out


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt ids with the special tokens the tokenizer puts before a text (LLaMA's BOS), as TRL's SFTTrainer tokenizes
    the prompts the policy is fine-tuned on; none after it (no EOS closes a prompt); no BOS doubled."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    with_specials, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    lead = next((with_specials[:i] for i in range(len(with_specials)) if with_specials[i:][: len(plain)] == plain), [])
    return [row if row[: len(lead)] == lead else lead + row for row in ids]


def decode_completions(tokenizer, prompts: list[list[int]], completions) -> list[str]:
    """Each completion's text as it continues its prompt: decoded with the prompt and cut after the prompt's text. A
    SentencePiece tokenizer (LLaMA) drops the leading space of a completion decoded alone ("Assistant:A")."""
    completions = [[int(t) for t in row] for row in completions]
    alone = tokenizer.batch_decode(completions, skip_special_tokens=True)
    heads = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    whole = tokenizer.batch_decode([p + c for p, c in zip(prompts, completions)], skip_special_tokens=True)
    return [w[len(h) :] if w.startswith(h) else a for w, h, a in zip(whole, heads, alone)]


def length_sorted_batches(ids: list[list[int]], batch_size: int, progress: str | None = None) -> list[list[int]]:
    """Positions of ``ids`` sorted by length, cut into batches (wrapped in a progress bar named ``progress``)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=progress, unit="batch")
    return batches


def _whole_model(model, accelerator):
    """A context giving the model with every weight present: TRL's unwrap for a trainer-wrapped model
    (DDP/FSDP/ZeRO-3), else hhrm's ZeRO-3 gather (a no-op unless ZeRO-3 partitioned the loaded model)."""
    if accelerator is not None:
        from trl.models.utils import unwrap_model_for_generation

        return unwrap_model_for_generation(model, accelerator)
    return modeling.full_parameters(model)


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``rows`` padded on the left: every prompt ends at the same position."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        attention[i, width - len(r) :] = 1
    return input_ids, attention


# The weights are whole on this rank (_whole_model): no step-by-step sync with the other ranks, which transformers
# turns on under ZeRO-3/FSDP and which hangs when ranks run different numbers of batches (or none: SFT's gold eval).
_LOCAL = {"synced_gpus": False}


@torch.no_grad()
def _generate(model, tokenizer, input_ids, attention, config: GenerationConfig, k: int) -> torch.Tensor:
    """``model.generate`` of a left-padded batch, ``k`` samples per prompt, in prompt-major order.

    For models that support a static KV cache (``_can_compile_fullgraph``: Llama, Mistral, ...) the
    cache is preallocated (a growing cache re-copies itself with ``torch.cat`` at every step: 64% of
    batched decode time on CPU), and each prompt is prefilled once and its cache repeated ``k`` times
    (``num_return_sequences`` would run the prefill ``k`` times). The last prompt token is left out of
    the prefill so that ``generate`` starts from it. ``make bench``, entry ``gen_batched_vs_prompt_x_k``.
    Other models (GPT-Neo's local attention needs a hybrid cache) use plain ``generate``.
    """
    width = input_ids.shape[1]
    # Under accelerate's autocast (mixed precision over fp32 weights: hasattr _original_forward) RoPE leaves the keys
    # fp32 and the values bf16, and a static cache takes one dtype from the first keys: the values then fail to copy.
    autocast = hasattr(model, "_original_forward")
    if autocast or not getattr(model, "_can_compile_fullgraph", False):
        return model.generate(
            input_ids=input_ids, attention_mask=attention, generation_config=config, tokenizer=tokenizer, **_LOCAL
        )
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=width + config.max_new_tokens)
    config = copy.deepcopy(config)
    config.disable_compile = True  # shapes change with every batch: no auto torch.compile on GPUs
    if k > 1 and width > 1:
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        model(
            input_ids=input_ids[:, :-1],
            attention_mask=attention[:, :-1],
            position_ids=positions[:, :-1],
            past_key_values=cache,
            use_cache=True,
        )
        for layer in cache.layers:  # prompt-major, like num_return_sequences
            layer.keys = layer.keys.repeat_interleave(k, dim=0)
            layer.values = layer.values.repeat_interleave(k, dim=0)
            layer.batch_size = layer.keys.shape[0]
        input_ids, attention = input_ids.repeat_interleave(k, dim=0), attention.repeat_interleave(k, dim=0)
        config.num_return_sequences = 1
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        generation_config=config,
        past_key_values=cache,
        tokenizer=tokenizer,
        **_LOCAL,
    )


def vllm_missing(mode: str) -> str | None:
    """Why ``generation_backend=vllm`` in ``vllm_mode=mode`` cannot run here; None when it can.

    RaftConfig asks when the settings are read, so a run is refused before its data and models load.
    """
    from trl.import_utils import is_requests_available, is_vllm_available

    if not is_vllm_available():
        return "vLLM is not installed (pip install -e '.[vllm]', on a machine with CUDA GPUs)"
    if mode == "server" and not is_requests_available():
        return "the requests package is not installed (TRL's VLLMClient talks HTTP to the server)"
    if mode == "server" and not torch.cuda.is_available():
        return (
            "the policy's weights go to the server over NCCL from a CUDA GPU of the main process "
            "(TRL's VLLMClient.init_communicator), and no CUDA GPU is visible to this process"
        )
    return None


class _Processes:
    """What TRL's ``VLLMGeneration`` reads from an ``Accelerator``, from accelerate's ``PartialState``.

    RAFT builds no ``Accelerator`` of its own: the fine-tunes' trainers set the process-wide DeepSpeed/FSDP
    state. No plugin here, so TRL reads parameters as they are; a ZeRO-3-partitioned policy loaded outside a
    trainer is gathered by :meth:`VLLMBackend.hold` around the push instead.
    """

    state = SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=None)

    def __init__(self):
        from accelerate import PartialState

        self._state = PartialState()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


class VLLMBackend:
    """vLLM generation for the policy, through TRL's ``VLLMGeneration`` (``colocate`` or ``server`` mode).

    Built once per run. :meth:`hold` makes it generate from a given policy, pushing that policy's weights
    into vLLM unless they are the ones pushed last (RAFT: after each fine-tune, and first thing in a run,
    a resumed one included). In server mode the engine is a ``trl vllm-serve`` / ``vllm serve`` process
    on other GPUs: TRL's ``VLLMClient`` connects at construction (waiting up to ``server_timeout`` s),
    the main process sends every process's prompts and pushes the weights over NCCL. Sampling settings
    are fixed at construction (TRL's wrapper holds them); :meth:`generate` checks it is asked for the same.
    """

    def __init__(
        self,
        model,
        tokenizer,
        accelerator,
        sampling: SamplingArguments,
        mode: str = "colocate",
        **vllm_kwargs: Any,
    ):
        """``model``: the policy (colocate: vLLM loads ``model.name_or_path``; server: may be None until
        :meth:`hold`). ``accelerator``: None for accelerate's process state. ``vllm_kwargs``: TRL's
        ``VLLMGeneration`` settings (``server_host``, ``server_port``, ``server_base_url``,
        ``server_timeout``, ``group_port``; colocate: ``gpu_memory_utilization``)."""
        try:
            from trl.generation.vllm_generation import VLLMGeneration
        except ImportError as e:  # vllm (and requests) are optional: `pip install -e .[vllm]`
            raise ImportError(f"generation_backend=vllm needs vLLM installed (pip install -e '.[vllm]'): {e}") from e
        # vLLM greedy is temperature 0; TRL's wrapper passes temperature through unchanged.
        temperature = sampling.temperature if sampling.do_sample else 0.0
        self.sampling, self.tokenizer = sampling, tokenizer
        self.processes = accelerator if accelerator is not None else _Processes()
        self.policy_path: str | None = None  # the policy whose weights vLLM holds (None: as it was started)
        stop = {"stop": [formatting.HUMAN]} if sampling.stop_at_turn_marker else {}
        self.engine = VLLMGeneration(
            model,
            self.processes,
            tokenizer,
            mode=mode,
            temperature=temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_completion_length=sampling.max_new_tokens,
            logprobs=None,
            generation_kwargs=stop,
            **vllm_kwargs,
        )

    def hold(self, path: str, model, accelerator=None) -> bool:
        """Generate from ``model``, the policy saved at ``path``: push its weights unless ``path``'s are the
        ones pushed last. Returns whether it pushed. Every process calls it (gathering shards is collective).

        ``accelerator``: the trainer's, when ``model`` is that trainer's (ZeRO-3/FSDP-sharded) model: TRL
        then gathers one parameter at a time. Without it, a model that ZeRO-3 partitioned at load is
        gathered whole by :func:`hhrm.modeling.full_parameters` (a no-op for any other model).
        """
        if path == self.policy_path:
            return False
        from trl.distributed import DistributedBackend

        self.engine.model = model
        self.engine.accelerator = accelerator if accelerator is not None else self.processes
        self.engine._dist = DistributedBackend(self.engine.accelerator)  # TRL reads the backend from it once
        with modeling.full_parameters(model) if accelerator is None else contextlib.nullcontext():
            self.engine.sync_weights()  # server: NCCL broadcast from the main process; then the prefix cache reset
        self.policy_path = path
        return True

    def generate(
        self,
        prompts: list[str],
        k: int,
        sampling: SamplingArguments | None = None,
        progress: bool = False,
        stats: dict[str, Any] | None = None,
    ) -> list[list[str]]:
        if sampling is not None and sampling != self.sampling:
            raise ValueError("VLLMBackend was built with other sampling settings; build one per setting")
        start = time.perf_counter()
        ids = prompt_ids(self.tokenizer, prompts)
        ids = self._same_count_everywhere(ids)
        if not ids:  # no process has a prompt (each knows: the counts were gathered)
            return []
        # K consecutive copies per prompt: what both VLLMGeneration modes expect for num_generations=K.
        repeated = [p for p in ids for _ in range(k)]
        _, completion_ids, _, _ = self.engine.generate(prompts=repeated, images=None, num_generations=k)
        completion_ids = completion_ids[: len(prompts) * k]  # drop the fillers' completions
        texts = decode_completions(
            self.tokenizer, [p for p in ids for _ in range(k)][: len(completion_ids)], completion_ids
        )
        cut = [formatting.cut_at_next_turn(t) if self.sampling.stop_at_turn_marker else t for t in texts]
        if stats is not None:
            stats.update(generated_tokens=sum(len(c) for c in completion_ids), seconds=time.perf_counter() - start)
        return [cut[i * k : (i + 1) * k] for i in range(len(prompts))]

    def _same_count_everywhere(self, ids: list[list[int]]) -> list[list[int]]:
        """Server mode: TRL gathers every process's prompts and hands process ``r`` the completions at
        ``r * len(prompts)``, which is right only when all processes send as many; RAFT's shards differ
        by one. Shorter shards are topped up with a one-token filler prompt, whose completions
        :meth:`generate` drops."""
        if self.engine.mode != "server" or self.processes.num_processes == 1:
            return ids
        from accelerate.utils import gather_object

        most = max(gather_object([len(ids)]))
        filler = [self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0]
        return ids + [filler] * (most - len(ids))
