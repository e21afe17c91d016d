"""Where a reward comes from: the one seam between "score these (prompt, response) pairs" and a reward model.

Every place that needs rewards (RAFT, ``make score``, ``make serve-rm``, ``make overopt``, ``make compare``, the RM
evaluation) builds one source with :func:`build` from its :class:`RewardArguments` and calls ``score_pairs``; none
of them asks whether the model is a folder or a server. A source is:

- ``score_pairs(prompts, responses) -> list[float]``: one reward each, in order;
- ``identity() -> dict``: what scores (weight files and convention, or the served model), never where: RAFT's
  resume fingerprint and the reports;
- ``describe() -> str``: the folder or URL, for logs and model cards;
- ``gathered()``: a context in which many ``score_pairs`` calls share one ZeRO-3 parameter gather;
- ``release()``: free the model's memory (RAFT's ``offload_models``); ``resident``: whether it is ready to score
  without loading anything (a server always is).

Sources: :class:`LocalModel` (a reward-model folder, :class:`hhrm.reward.scoring.RewardScorer` in this process)
and the servers of :mod:`hhrm.reward.client` (hhrm's, OpenRLHF's ``/get_reward``, vLLM's ``/classify`` and
``/pooling``). Like TRL GRPO's ``reward_funcs``, a new kind of source is one class with those five methods and one
line in :func:`build`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from hhrm.reward import client, conventions, ensemble

APIS = ("hhrm", "openrlhf", "vllm-classify", "vllm-pooling")


class RewardSource(Protocol):
    def score_pairs(self, prompts: list[str], responses: list[str]) -> list[float]: ...
    def identity(self) -> dict[str, Any]: ...
    def describe(self) -> str: ...
    def gathered(self): ...
    def release(self) -> None: ...
    @property
    def resident(self) -> bool: ...


@dataclass
class RewardArguments:
    """Where the rewards come from: a reward-model folder, or a server (and how to speak to it)."""

    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Reward model folder (recipes/rm.py's output, or any one-label sequence classifier; a multi-head "
            "or seeds ensemble RM scores as an ensemble by reward_aggregation). With reward_api=vllm-*: the folder "
            "the vLLM server serves, for its tokenizer. Or reward_model_url."
        },
    )
    reward_model_url: str | None = field(
        default=None,
        metadata={
            "help": "Score through a reward server instead (e.g. http://10.0.0.2:8000): the reward model's memory on "
            "another machine. Which protocol: reward_api."
        },
    )
    reward_api: str = field(
        default="hhrm",
        metadata={
            "help": "reward_model_url speaks: hhrm (make serve-rm: POST /score) | openrlhf (POST /get_reward) | "
            "vllm-classify / vllm-pooling (a vLLM-served classifier; raw logits).",
            "choices": list(APIS),
        },
    )
    reward_convention: str | None = field(
        default=None,
        metadata={
            "help": "How the reward model is scored: one of "
            + ", ".join(conventions.PRESETS)
            + ". Unset: what the folder records (hhrm's RMs do), else hhrm for a tokenizer with pad != EOS; a "
            "pad == EOS model that records none must name one (the seed card's RM: card-pipeline). README: 'Bring "
            "your own reward model'."
        },
    )
    reward_batch_size: int = field(
        default=64,
        metadata={"help": "Texts per reward-model forward (a folder) or per request (a server), at most."},
    )
    reward_request_timeout: float = field(
        default=300.0, metadata={"help": "reward_model_url: seconds one scoring request may take."}
    )
    reward_request_retries: int = field(
        default=3, metadata={"help": "reward_model_url: retries of a failed request (transport error or 5xx)."}
    )
    reward_served_model: str | None = field(
        default=None, metadata={"help": "reward_api=vllm-*: the served model's name (vLLM's --served-model-name)."}
    )
    reward_ensemble: list[str] | None = field(
        default=None,
        metadata={
            "help": "E reward-model folders scored as one reward, instead of reward_model_name_or_path: one reward "
            "per text by reward_aggregation (hhrm.reward.ensemble). A multi-head RM counts its heads; the RM "
            "recipe's ensemble_kind=seeds output_dir stands for its member-<e> folders."
        },
    )
    reward_aggregation: str = field(
        default="mean",
        metadata={
            "help": "An ensemble's rule (reward_ensemble, or a multi-head RM's heads): mean | worst (minimum over "
            "members) | uwo (mean - reward_uwo_lambda x variance over members; Coste et al. 2023).",
            "choices": ["mean", "worst", "uwo"],
        },
    )
    reward_uwo_lambda: float = field(
        default=0.5, metadata={"help": "reward_aggregation=uwo: weight of the members' variance (>= 0)."}
    )

    def check_reward_source(self) -> None:
        """Refuse, in one line naming the setting, a source that cannot be built (before anything loads)."""
        if self.reward_ensemble and (self.reward_model_name_or_path or self.reward_model_url):
            raise ValueError(
                "reward_ensemble and reward_model_name_or_path/reward_model_url are both set: give the ensemble's "
                "folders only (one folder is reward_ensemble with E=1)"
            )
        ensemble.check_settings(self)  # reward_ensemble and its rule
        folder, url = self.reward_model_name_or_path, self.reward_model_url
        vllm = self.reward_api.startswith("vllm-")
        checks = [
            (self.reward_api in APIS, f"reward_api={self.reward_api!r}: one of {', '.join(APIS)}"),
            (bool(folder or url or self.reward_ensemble), "reward_model_name_or_path is not set: give the reward "
             "model folder (recipes/rm.py output), reward_model_url for a reward server, or reward_ensemble"),
            (not (folder and url) or vllm, "reward_model_name_or_path and reward_model_url are both set: give one "
             "(both only with reward_api=vllm-*: the folder is the served model's, for its tokenizer)"),
            (not vllm or bool(folder and url), f"reward_api={self.reward_api}: set reward_model_url (the vLLM "
             "server) and reward_model_name_or_path (the folder it serves: hhrm builds the token ids by its "
             "tokenizer, as verl does)"),
            (not url or vllm or self.reward_api == "hhrm" or not self.reward_convention,
             f"reward_convention={self.reward_convention!r} with reward_api={self.reward_api}: that server applies "
             "its own convention; leave reward_convention unset"),
            (self.reward_api != "hhrm" or not url or not self.reward_convention,
             f"reward_convention={self.reward_convention!r} with reward_model_url: an hhrm server scores by the "
             "convention it was started with (make serve-rm ARGS='--reward_convention ...'); leave it unset here"),
            (self.reward_batch_size >= 1, f"reward_batch_size={self.reward_batch_size}: must be >= 1"),
            (self.reward_request_timeout > 0, f"reward_request_timeout={self.reward_request_timeout}: must be > 0"),
            (self.reward_request_retries >= 0, f"reward_request_retries={self.reward_request_retries}: must be >= 0"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.reward_convention is not None:
            conventions.by_name(self.reward_convention)


def setting(name: str, **overrides):
    """A config field for one of :class:`RewardArguments`' settings, with its help (and default unless overridden):
    a config that takes only some of them (the server, the RM stage) does not retype their help."""
    home = {f.name: f for f in fields(RewardArguments)}[name]
    return field(default=overrides.get("default", home.default), metadata=home.metadata)


class LocalModel:
    """A reward-model folder scored in this process. The folder and its convention are checked when built (no
    weights loaded); the model loads at the first ``score_pairs`` (or ``scorer``) and ``release`` frees it."""

    def __init__(
        self,
        path: str,
        convention: str | None = None,
        device: str | None = None,
        dtype=None,
        batch_size: int = 64,
        max_tokens_per_batch: int = 32_768,
        setting: str = "reward_model_name_or_path",
    ):
        from hhrm import model_checks

        self.path, self.setting, self.device, self.dtype = str(path), setting, device, dtype
        self.scorer_kwargs = dict(batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch)
        self.tokenizer = model_checks.check_reward_model(path, setting)
        self.convention = conventions.resolve(path, convention, self.tokenizer)
        self.heads = model_checks.reward_heads(path)  # > 1: a multi-head RM, scored through ensemble.Ensemble
        self._scorer = None

    @property
    def scorer(self):
        """The :class:`hhrm.reward.scoring.RewardScorer`, loaded on first use."""
        if self._scorer is None:
            from hhrm.reward.scoring import RewardScorer

            self._scorer = RewardScorer.from_pretrained(
                self.path, self.device, self.dtype, self.setting, convention=self.convention.name, **self.scorer_kwargs
            )
        return self._scorer

    def score_pairs(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.scorer.score_pairs(prompts, responses)

    def identity(self) -> dict[str, Any]:
        from hhrm import model_checks

        out = {"weights": model_checks.weights_identity(self.path), "convention": self.convention.name}
        return out | ({"heads": self.heads} if self.heads > 1 else {})

    def describe(self) -> str:
        return self.path

    def gathered(self):
        from hhrm import modeling

        return modeling.full_parameters(self.scorer.model)

    def release(self) -> None:
        self._scorer = None

    @property
    def resident(self) -> bool:
        return self._scorer is not None


def build(
    args: RewardArguments,
    device: str | None = None,
    dtype=None,
    max_tokens_per_batch: int = 32_768,
    setting: str = "reward_model_name_or_path",
) -> RewardSource:
    """The reward source ``args`` name, checked now (a folder's files and convention; a server answering).
    ``setting``: what a refusal calls the folder (``make score`` takes it as ``model_name_or_path`` too)."""
    args.check_reward_source()
    remote = dict(timeout=args.reward_request_timeout, retries=args.reward_request_retries)
    remote |= dict(batch_size=args.reward_batch_size, setting="reward_model_url")
    if args.reward_ensemble or (
        not args.reward_model_url and ensemble.is_ensemble_folder(args.reward_model_name_or_path)
    ):
        return ensemble.build(args, LocalModel, device, dtype, max_tokens_per_batch, setting)
    if not args.reward_model_url:
        return LocalModel(
            args.reward_model_name_or_path, args.reward_convention, device, dtype, args.reward_batch_size,
            max_tokens_per_batch, setting,
        )  # fmt: skip
    if args.reward_api == "hhrm":
        return client.HhrmServer(args.reward_model_url, **remote)
    if args.reward_api == "openrlhf":
        return client.OpenRLHFServer(args.reward_model_url, **remote)
    from hhrm import model_checks

    tokenizer = model_checks.check_reward_model(args.reward_model_name_or_path, setting)
    # vLLM reads the true last token: the default is verl's convention, the way verl scores a vLLM-served RM.
    name = args.reward_convention or conventions.recorded(args.reward_model_name_or_path) or "verl-vllm"
    convention = conventions.by_name(name)
    conventions.check(convention, tokenizer)
    endpoint = args.reward_api.removeprefix("vllm-")
    return client.VLLMServer(
        args.reward_model_url, tokenizer=tokenizer, convention=convention, model=args.reward_served_model,
        endpoint=endpoint, **remote,
    )  # fmt: skip


# Settings that change how the reward model is reached, never a reward (a run may resume with other values).
HOW_TO_REACH = ("reward_model_url", "reward_batch_size", "reward_request_timeout", "reward_request_retries")
# The settings that say which reward model scores: a comparison of runs requires them equal.
WHICH_MODEL = ("reward_model_name_or_path", "reward_model_url", "reward_api", "reward_convention", "reward_ensemble")
WHICH_MODEL += ("reward_aggregation", "reward_uwo_lambda")


def address(args: Any) -> str:
    """The source's address as the user wrote it (reports, without building a source): the URL, else the folder."""
    get = args.get if isinstance(args, dict) else lambda k: getattr(args, k, None)
    if get("reward_ensemble") or (
        not get("reward_model_url") and ensemble.is_ensemble_folder(get("reward_model_name_or_path"))
    ):
        return ensemble.address(args)
    return str(get("reward_model_url") or Path(get("reward_model_name_or_path") or ""))
