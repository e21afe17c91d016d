"""Which of RAFT's models is in memory: the policy of the current iteration and the reward model.

A stage asks for the model it needs; with ``offload_models`` on, only one of the two large models is
resident at a time. After a fine-tune the trained policy stays resident for the next generate stage
(through the trainer's wrapped model under ZeRO-3/FSDP), unless offloading or LoRA says otherwise.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import trl
from accelerate import PartialState
from trl import get_peft_config

import hhrm.raft.alarm as alarm
from hhrm import generation, model_checks, modeling, runtime
from hhrm.raft.config import RaftConfig
from hhrm.reward import sources

# offload_models unset: a policy checkpoint above this size (≈1B fp32 / 2B bf16 params) is "big".
OFFLOAD_AUTO_BYTES = 4 * 1024**3


def check_reward_text(source, args: RaftConfig, model_args: trl.ModelConfig, tokenizer, text_rule: str) -> None:
    """A reward model folder that reads the policy's text: under a chat template the RM scores the policy's rendering
    (hhrm's convention), so one trained on another template's text is refused. A server's model is its own."""
    if not isinstance(source, sources.LocalModel) or source.convention.text == "chat_template":
        return
    if text_rule == "chat_template" and source.tokenizer.chat_template != tokenizer.chat_template:
        raise ValueError(
            f"use_chat_template=true, but the reward model {args.reward_model_name_or_path!r} has another "
            f"chat_template than the policy {model_args.model_name_or_path!r}: RAFT's prompts and samples are "
            "rendered with the policy's template; train the RM with the same template, or use_chat_template=false"
        )


def check_vllm_policy(args: RaftConfig, model_args: trl.ModelConfig, tokenizer) -> None:
    """Refuse at the start what vLLM cannot generate from: a GPT-Neo policy (vLLM has no GPT-Neo model, and its
    Transformers fallback needs ``_supports_attention_backend``, which transformers' GPT-Neo lacks), and, with a vLLM
    server, a tokenizer that grew past the checkpoint's vocabulary (a pad token added to GPT-Neo's): the server holds
    the checkpoint's embedding rows and the weight push sends more."""
    if args.generation_backend != "vllm":
        return
    where = f"generation_backend=vllm with model_name_or_path={model_args.model_name_or_path!r}"
    _, config = model_checks.model_config(
        model_args.model_name_or_path, "model_name_or_path", "point it at a causal LM", model_args.model_revision
    )
    if (
        any(a.startswith("GPTNeo") for a in getattr(config, "architectures", None) or [])
        or config.model_type == "gpt_neo"
    ):
        raise ValueError(f"{where}: vLLM cannot run GPT-Neo (no native model; its Transformers fallback needs an "
                         "attention-backend hook GPT-Neo lacks); use generation_backend=hf")  # fmt: skip
    if args.vllm_mode == "server" and len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens (a pad token was added), the checkpoint "
            f"{config.vocab_size} rows: start the vLLM server from a folder saved with the resized vocabulary"
        )


def vllm_backend(args: RaftConfig, tokenizer, model=None) -> generation.VLLMBackend:
    """TRL's vLLM engine for ``generation_backend=vllm``: a ``trl vllm-serve`` server's client, or colocated
    (vLLM loads ``model``'s folder in each process)."""
    if args.vllm_mode == "server":
        where = dict(
            server_base_url=args.vllm_server_base_url,
            server_host=args.vllm_server_host or "0.0.0.0",  # unused with a base URL (the config requires one)
            server_port=args.vllm_server_port,
            server_timeout=args.vllm_server_timeout,
            group_port=args.vllm_group_port,
        )
    else:
        where = dict(gpu_memory_utilization=args.vllm_gpu_memory_utilization)
    return generation.VLLMBackend(model, tokenizer, None, args.sampling, mode=args.vllm_mode, **where)


def resolve_offload(offload_models: bool | None, policy_path: str) -> bool:
    """``offload_models`` when set; else on for a policy folder over ~1B parameters or a hub id."""
    if offload_models is not None:
        return offload_models
    path = Path(policy_path)
    if not path.is_dir():
        return True  # a hub id: the card's models are billions of parameters
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin")]
    return sum(f.stat().st_size for f in weights) > OFFLOAD_AUTO_BYTES


@dataclass
class Policy:
    path: str
    model: Any
    accelerator: Any = None  # set when ``model`` is a trainer's wrapped model (DDP / ZeRO-3 engine)
    trainer: Any = None


class ModelResidency:
    """Loads, keeps and frees the policy and the reward scorer of one RAFT run."""

    def __init__(
        self, args: RaftConfig, model_args: trl.ModelConfig, tokenizer, state: PartialState, text_rule: str = "hh"
    ):
        self.args, self.model_args, self.tokenizer, self.state = args, model_args, tokenizer, state
        # Refuse a non-RM folder, an unusable convention, or a reward server that does not answer, before any
        # generation. A folder's weights load only when a score stage needs them.
        self.rewards = sources.build(args, str(state.device), runtime.torch_dtype(args.bf16))
        check_reward_text(self.rewards, args, model_args, tokenizer, text_rule)
        check_vllm_policy(args, model_args, tokenizer)
        self.offload = resolve_offload(args.offload_models, model_args.model_name_or_path)
        self._policy: Policy | None = None
        # vllm server mode: connect now (fails after vllm_server_timeout s if no server answers), not at iteration 0.
        server = args.generation_backend == "vllm" and args.vllm_mode == "server"
        self._vllm = vllm_backend(args, tokenizer) if server else None

    # ----- loading and freeing -----------------------------------------------------------

    def release(self, policy: bool = True, scorer: bool = True) -> None:
        """Drop the named models (both by default) and return their memory."""
        if policy:
            self._policy = None
        if scorer:
            self.rewards.release()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def policy(self, path: str) -> Policy:
        """The policy saved at ``path``, loaded unless it is the resident one."""
        if self._policy is not None and self._policy.path == path:
            return self._policy
        self.release(policy=True, scorer=self.offload)
        from transformers import AutoModelForCausalLM

        kwargs = modeling.model_init_kwargs(replace(self.model_args, model_name_or_path=path), self.args)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        modeling.match_vocab(model, self.tokenizer)
        if not getattr(model, "hf_device_map", None):
            model.to(self.state.device)
        self._policy = Policy(path=path, model=model)
        return self._policy

    def policy_for_training(self, path: str) -> Policy:
        """The policy at ``path`` as a model a new trainer may wrap (never another trainer's engine)."""
        policy = self.policy(path)
        if policy.trainer is not None:
            self.release(policy=True, scorer=False)
            policy = self.policy(path)
        if self.offload:
            self.release(policy=False, scorer=True)
        return policy

    def keep_trained(self, trainer: trl.SFTTrainer, path: str) -> None:
        """After a fine-tune: keep the trained model resident as the policy saved at ``path``, or free it."""
        if self.offload or get_peft_config(self.model_args) is not None:
            self.release(policy=True, scorer=False)
            return
        # Under ZeRO-3/FSDP the model is sharded: generation goes through the trainer's wrapped model
        # and unwrap_model_for_generation.
        wrapped = trainer.model_wrapped
        sharded = wrapped is not trainer.model
        self._policy = Policy(
            path=path,
            model=wrapped if sharded else trainer.accelerator.unwrap_model(trainer.model),
            accelerator=trainer.accelerator if sharded else None,
            trainer=trainer if sharded else None,
        )

    # ----- using them --------------------------------------------------------------------

    def generate(
        self,
        path: str,
        prompts: list[str],
        k: int,
        sampling: generation.SamplingArguments,
        seed: int,
        stats: dict[str, Any],
    ) -> list[list[str]]:
        """``k`` responses per prompt from the policy at ``path`` (all ranks call this: ZeRO-3 gathers)."""
        policy = self.policy(path)
        progress = self.args.progress and self.state.is_main_process
        if self.args.generation_backend == "vllm" and sampling == self.args.sampling:
            if self._vllm is None:  # colocate: vLLM loads the first policy it generates from
                self._vllm = vllm_backend(self.args, self.tokenizer, policy.model)
            # Pushes the weights once per policy: after each fine-tune, and first thing in a (resumed) run.
            trainer = policy.trainer  # set when the model is a trainer's sharded one: TRL gathers it per parameter
            self._vllm.hold(path, trainer.model if trainer else policy.model, trainer.accelerator if trainer else None)
            return generation.generate_responses(
                self._vllm, self.tokenizer, prompts, k, sampling, stats=stats, progress=progress
            )
        return generation.generate_responses(
            policy.model,
            self.tokenizer,
            prompts,
            k,
            sampling,
            self.args.generation_batch_size,
            progress=progress,
            accelerator=policy.accelerator,
            seed=seed,
            stats=stats,
        )

    def score(self, prompts: list[str], responses: list[str], desc: str) -> list[float]:
        """Rewards of ``prompt + response`` pairs, in chunks so a progress bar can move."""
        return self.score_spread(prompts, responses, desc)["reward"]

    def score_spread(self, prompts: list[str], responses: list[str], desc: str) -> dict[str, list[float]]:
        """``reward`` per pair and, from a source that scores its members (an ensemble: hhrm.raft.alarm), the
        members' ``std`` and ``mean`` beside it."""
        if not self.rewards.resident:
            self.release(policy=self.offload, scorer=False)  # offload_models: the policy leaves before the RM loads
        chunk = max(self.args.reward_batch_size * 8, 1)
        starts = range(0, len(prompts), chunk)
        if self.args.progress and self.state.is_main_process:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="chunk")
        members = alarm.is_ensemble(self.rewards)
        out: dict[str, list[float]] = {"reward": []} | ({"std": [], "mean": []} if members else {})
        # One gather for all chunks: ranks' shards differ in size, so their chunk counts may too.
        with self.rewards.gathered():
            for s in starts:
                p, r = prompts[s : s + chunk], responses[s : s + chunk]
                got = self.rewards.score_members(p, r) if members else {"reward": self.rewards.score_pairs(p, r)}
                for k, values in out.items():
                    values += got[k]
        return out

    def token_counts(self, responses: list[str]) -> list[int]:
        if not responses:
            return []
        return [len(x) for x in self.tokenizer(responses, add_special_tokens=False)["input_ids"]]
