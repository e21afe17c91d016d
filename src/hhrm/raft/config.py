"""RAFT's settings: ``RaftConfig`` beside TRL's ``SFTConfig``, validated when parsed."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import trl

import hhrm.raft.alarm as alarm
from hhrm import generation
from hhrm.generation import SamplingArguments
from hhrm.raft.select import SELECTIONS, UPDATES, JunkFilter, check_selection_rule
from hhrm.reward.sources import RewardArguments
from hhrm.runtime import StageConfigMixin

# The stages of one iteration, in order; each writes one main output (see hhrm.raft).
STAGES = ("draw", "generate", "score", "select", "train", "metrics")
BACKENDS = ("hf", "vllm")
VLLM_MODES = ("colocate", "server")


# DPO's settings have their home in TRL's DPOConfig: RaftConfig takes their defaults and help from there.
_DPO = {f.name: f for f in fields(trl.DPOConfig)}
# TRL 1.16 checks loss_type at the first training step (after a whole generate stage); hhrm checks it when parsed.
# tests/test_raft_select.py checks this list against DPOConfig's help.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip


class StopRequested(Exception):
    """Raised after the stage named by ``stop_after`` (tests and staged runs stop there on purpose)."""


class NothingToTrain(ValueError):
    """An iteration's select stage kept nothing (every sample filtered, or no pair past the margin): the run stops
    there, saying why and which settings to change (a ValueError: recipes print it as one line, exit code 2)."""


@dataclass
class RaftConfig(StageConfigMixin, RewardArguments, trl.SFTConfig):
    """RAFT settings beside TRL's SFTConfig, which holds the per-iteration fine-tune settings, and the reward source's
    (:class:`hhrm.reward.sources.RewardArguments`).

    ``output_dir`` is the run folder; the fine-tune of iteration ``i`` uses every SFT setting here
    with ``seed + i``. Defaults follow the card (2,048 prompts per iteration, K=8, best of K).
    """

    bf16: bool | None = field(default=None, metadata={"help": "None: bf16 on a bf16-capable GPU, fp32 elsewhere."})
    max_length: int | None = field(default=1024, metadata={"help": "Fine-tune: truncate prompt+completion tokens."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Fine-tune epochs over each iteration's kept set."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Fine-tune learning rate (each iteration)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Fine-tune schedule (each iteration)."})
    save_strategy: str = field(default="no", metadata={"help": "Trainer checkpoints inside an iteration (off)."})

    num_iterations: int = field(default=10, metadata={"help": "RAFT iterations."})
    prompts_per_iteration: int = field(default=2048, metadata={"help": "Prompts drawn per iteration (card: 2,048)."})
    num_samples: int = field(default=8, metadata={"help": "K: responses generated per prompt (card: 8)."})
    selection: str = field(
        default="best_of_k", metadata={"help": "Which samples are kept.", "choices": list(SELECTIONS)}
    )
    top_fraction: float = field(
        default=0.125, metadata={"help": "top_fraction: share of all K*N samples kept (1/K keeps N)."}
    )
    selection_kl_beta: float = field(
        default=0.0,
        metadata={
            "help": "Regularised selection (RBoN-KL, Jinnai et al. 2024): rank samples by reward + this * "
            "log pi(y|x), pi the iteration's sampling policy, log pi summed over the response tokens at the sampling "
            "temperature: -log pi(y|x) is the KL of the one-point distribution on y to pi, the rule's penalty (a "
            "per-token mean would not be; top-p/top-k truncation is not modelled). Computed in the generate stage, "
            "kept in samples.jsonl (response_logprobs). 0: plain reward. best_of_k and top_fraction; update=sft only "
            "(DPO's beta regularises its pairs)."
        },
    )
    selection_temperature: float = field(
        default=0.0,
        metadata={
            "help": "Soft best-of-K: keep one sample per prompt drawn with probability softmax(score / this), score "
            "the (regularised) reward; seeded by seed and iteration, so a resumed run keeps the same set. 0: argmax. "
            "selection=best_of_k and update=sft only."
        },
    )
    update: str = field(
        default="sft",
        metadata={
            "help": "How each iteration updates the policy: sft (RAFT: fine-tune on the kept samples, SFTTrainer) | "
            "dpo (iterative DPO: per prompt the best and the worst of the K samples as a preference pair, trained "
            "with DPOTrainer against the iteration's starting policy as reference).",
            "choices": list(UPDATES),
        },
    )
    beta: float = field(
        default=_DPO["beta"].default, metadata={"help": "update=dpo: " + _DPO["beta"].metadata["help"]}
    )
    dpo_loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": "update=dpo: DPOConfig's loss_type (named apart from SFTConfig's). "
            + _DPO["loss_type"].metadata["help"]
        },
    )
    pair_margin: float = field(
        default=0.0,
        metadata={
            "help": "update=dpo: a prompt makes a pair only when its best reward exceeds its worst by more than this "
            "(0: any strict difference; tied prompts are skipped and counted)."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={
            "help": "update=dpo: compute the reference log-probs before training, with the policy itself (it is the "
            "reference: the iteration's starting policy), so no second model is held. false: DPOTrainer loads a "
            "reference copy from the policy's folder (always under ZeRO-3: DeepSpeed cannot run the precompute pass)."
        },
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Sampling: max new tokens per response."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Sampling nucleus threshold (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Sampling top-k (0: off)."})
    max_prompt_tokens: int = field(
        default=512, metadata={"help": "Prompts longer than this (policy tokens) are left out of the prompt set."}
    )
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per generate call (x K sequences)."})
    filter_min_tokens: int = field(default=2, metadata={"help": "Junk filter: responses shorter are dropped."})
    filter_max_repeat_fraction: float = field(
        default=0.5, metadata={"help": "Junk filter: max share of repeated word 3-grams (1.0: off)."}
    )
    filter_patterns: list[str] = field(
        default_factory=list, metadata={"help": "Junk filter: regular expressions; a matching response is dropped."}
    )
    heldout_prompts: int = field(
        default=200, metadata={"help": "Fixed held-out prompts (RM test) evaluated each iteration."}
    )
    offload_models: bool | None = field(
        default=None,
        metadata={"help": "Keep one large model resident at a time. Unset: on when the policy is above ~1B params."},
    )
    generation_backend: str = field(
        default="hf", metadata={"help": "hf (transformers generate) | vllm.", "choices": list(BACKENDS)}
    )
    vllm_mode: str = field(
        default="colocate",
        metadata={
            "help": "vllm: colocate (a vLLM engine inside each training process, on its GPU) | server (a "
            "`trl vllm-serve` process on other GPUs; the policy's weights are pushed to it after each fine-tune).",
            "choices": list(VLLM_MODES),
        },
    )
    vllm_gpu_memory_utilization: float = field(default=0.4, metadata={"help": "vllm colocate: GPU memory share."})
    vllm_server_host: str | None = field(
        default=None,
        metadata={"help": "vllm server: host of the `trl vllm-serve` process (e.g. 127.0.0.1 on the same node)."},
    )
    vllm_server_port: int = field(default=8000, metadata={"help": "vllm server: its --port."})
    vllm_server_base_url: str | None = field(
        default=None,
        metadata={"help": "vllm server: its URL (e.g. http://10.0.0.3:8000), in place of host and port."},
    )
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "vllm server: seconds to wait for it to answer at start before failing."}
    )
    vllm_group_port: int = field(
        default=51216,
        metadata={"help": "vllm server: port on the main training process's node for the NCCL weight-push group."},
    )
    overopt_alarm_disagreement: float | None = field(
        default=None,
        metadata={
            "help": "Over-optimisation alarm (hhrm.raft.alarm; needs a reward_ensemble, E >= 2): fires at an "
            "iteration whose kept samples' ensemble std (disagreement_kept) rose by more than this fraction over "
            "iteration 0's (0.5: a rise of half). None: off."
        },
    )
    overopt_alarm_gap: float | None = field(
        default=None,
        metadata={
            "help": "Over-optimisation alarm: fires when proxy_gap (kept-set proxy reward minus the policy's held-out "
            "sampled reward) rose by more than this (reward units) since iteration 0. None: off."
        },
    )
    stop_on_alarm: bool = field(
        default=False,
        metadata={
            "help": "When the alarm fires at iteration i: stop there, before its fine-tune; the final policy is "
            "policy i (the one iteration i sampled from). false: log and record it only."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Progress bars for generation and scoring."})
    stop_after: str | None = field(
        default=None, metadata={"help": "'<iteration>:<stage>': stop after that stage (staged runs, tests)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        checks: list[tuple[bool, str]] = [
            (self.num_iterations >= 1, f"num_iterations={self.num_iterations}: must be >= 1"),
            (self.prompts_per_iteration >= 1, f"prompts_per_iteration={self.prompts_per_iteration}: must be >= 1"),
            (self.num_samples >= 1, f"num_samples={self.num_samples}: must be >= 1"),
            (self.selection in SELECTIONS, f"selection={self.selection!r}: expected one of {SELECTIONS}"),
            (0.0 < self.top_fraction <= 1.0, f"top_fraction={self.top_fraction}: must be in (0, 1]"),
            (self.update in UPDATES, f"update={self.update!r}: expected one of {UPDATES}"),
            (self.beta > 0, f"beta={self.beta}: DPO's beta must be > 0 (it scales the log-ratios; TRL's default 0.1)"),
            (self.pair_margin >= 0, f"pair_margin={self.pair_margin}: must be >= 0"),
            (self.max_prompt_tokens >= 1, f"max_prompt_tokens={self.max_prompt_tokens}: must be >= 1"),
            (self.generation_batch_size >= 1, f"generation_batch_size={self.generation_batch_size}: must be >= 1"),
            (self.heldout_prompts >= 0, f"heldout_prompts={self.heldout_prompts}: must be >= 0"),
            (
                self.generation_backend in BACKENDS,
                f"generation_backend={self.generation_backend!r}: expected one of {BACKENDS}",
            ),
            (self.vllm_mode in VLLM_MODES, f"vllm_mode={self.vllm_mode!r}: expected one of {VLLM_MODES}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.check_reward_source()
        alarm.check_settings(self)
        self.check_update()
        check_selection_rule(self.selection, self.update, self.selection_kl_beta, self.selection_temperature)
        self.check_generation_backend()
        # Built (and so validated) now, not after the first model load.
        self.sampling = SamplingArguments(
            max_new_tokens=self.max_new_tokens,
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
        )
        self.greedy = SamplingArguments(max_new_tokens=self.max_new_tokens, do_sample=False)
        self.junk_filter = JunkFilter(
            min_tokens=self.filter_min_tokens,
            max_repeat_fraction=self.filter_max_repeat_fraction,
            patterns=list(self.filter_patterns or []),
        )
        self.stop_point = self.parse_stop_after()

    def check_update(self) -> None:
        """update=dpo needs pairs: K >= 2 samples per prompt, a per-prompt selection and a loss TRL knows."""
        if isinstance(self.dpo_loss_type, str):
            self.dpo_loss_type = [self.dpo_loss_type]
        unknown = [t for t in self.dpo_loss_type if t not in DPO_LOSS_TYPES]
        if unknown:
            raise ValueError(f"dpo_loss_type={unknown}: not a DPO loss type; expected among {DPO_LOSS_TYPES}")
        if self.update != "dpo":
            return
        if self.num_samples < 2:
            raise ValueError(
                f"num_samples={self.num_samples} with update=dpo: a preference pair needs at least 2 samples per "
                "prompt; set num_samples >= 2 (the card's K is 8)"
            )
        if self.selection != "best_of_k":
            raise ValueError(
                f"selection={self.selection!r} with update=dpo: DPO pairs the best and the worst sample of a prompt; "
                "selection applies to update=sft only (leave it at best_of_k)"
            )

    def check_generation_backend(self) -> None:
        """Refuse now what cannot work with the generation settings (not after the data and the first model load)."""
        uses_server = self.vllm_mode == "server" or self.vllm_server_host or self.vllm_server_base_url
        if self.generation_backend != "vllm":
            if uses_server:
                raise ValueError(
                    f"vllm_mode={self.vllm_mode!r} / vllm_server_*: they apply to generation_backend=vllm, and "
                    f"generation_backend={self.generation_backend!r}: add --generation_backend vllm or drop them"
                )
            return
        if self.vllm_mode == "server":
            url = self.vllm_server_base_url
            checks = [
                (
                    bool(self.vllm_server_host or url),
                    "vllm_mode=server: no server address; set vllm_server_host (and vllm_server_port) or "
                    "vllm_server_base_url to where `trl vllm-serve` listens",
                ),
                (
                    not url or url.startswith(("http://", "https://")),
                    f"vllm_server_base_url={url!r}: not an http(s) URL",
                ),
                (0 < self.vllm_server_port < 65536, f"vllm_server_port={self.vllm_server_port}: not a port"),
                (0 < self.vllm_group_port < 65536, f"vllm_group_port={self.vllm_group_port}: not a port"),
                (self.vllm_server_timeout > 0, f"vllm_server_timeout={self.vllm_server_timeout}: must be > 0"),
            ]
            for ok, message in checks:
                if not ok:
                    raise ValueError(message)
        missing = generation.vllm_missing(self.vllm_mode)
        if missing:
            raise ValueError(f"generation_backend=vllm (vllm_mode={self.vllm_mode}): {missing}")

    def seed_for(self, iteration: int, stage: int, rank: int) -> int:
        """Sampling seed: depends on (seed, iteration, stage, rank) only, never on what ran before."""
        return (self.seed * 1_000_003 + iteration * 101 + stage) * 257 + rank

    def parse_stop_after(self) -> tuple[int, str] | None:
        if self.stop_after is None:
            return None
        try:
            it, stage = str(self.stop_after).split(":")
            it_n = int(it)
        except ValueError:
            raise ValueError(
                f"stop_after={self.stop_after!r}: expected '<iteration>:<stage>', e.g. '1:score'"
            ) from None
        if stage not in STAGES:
            raise ValueError(f"stop_after={self.stop_after!r}: stage must be one of {STAGES}")
        return it_n, stage
