"""The reward server's model process (a LitServe ``LitAPI``): one reward source on one device, built through the seam
(:func:`hhrm.reward.sources.build`), scoring each LitServe batch of already-encoded texts in one call.

A single reward-model folder scores by ``RewardScorer.score_ids`` and answers one reward per text, as it always did.
A source with member rewards (an :class:`hhrm.reward.ensemble.Ensemble`, or any source with the same two methods:
``table_ids(ids, token_type_ids) -> [E, N]`` and ``summary(table) -> {reward, mean, std, members}``) answers, per
request, its ``summary``: the rule's reward and the members' mean, std and rewards per text
(:mod:`hhrm.reward.protocol` turns either into the JSON answer).
"""

from __future__ import annotations

import signal
import time

import litserve as ls
import torch

from hhrm.reward import ensemble, sources
from hhrm.reward.protocol import STATS


def reward_arguments(config) -> sources.RewardArguments:
    """The seam's settings of a :class:`hhrm.reward.server.ServeConfig`: one folder, or an ensemble."""
    return sources.RewardArguments(
        reward_model_name_or_path=None if config.reward_ensemble else config.model_name_or_path,
        reward_ensemble=config.reward_ensemble,
        reward_aggregation=config.reward_aggregation,
        reward_uwo_lambda=config.reward_uwo_lambda,
        reward_convention=config.reward_convention,
        reward_batch_size=config.reward_batch_size,
    )


def build_source(config, device: str | None = None, dtype=None):
    """The server's reward source, checked (files, convention; members alike); no weights are loaded here."""
    args = reward_arguments(config)
    return sources.build(args, device, dtype, config.max_tokens_per_batch, setting="model_name_or_path")


def with_members(source) -> bool:
    """Whether ``source`` answers member rewards (an ensemble of folders or heads: ``table_ids`` and ``summary``)."""
    return ensemble.has_members(source)


def loaded_models(source) -> list[torch.nn.Module]:
    """Load ``source``'s models now (so /health is 200 only once they are) and return them: a folder's scorer, an
    ensemble's members' (in order), or a source's own ``model``."""
    if hasattr(source, "scorer"):
        return [source.scorer.model]
    if getattr(source, "members", None):
        return [model for member in source.members for model in loaded_models(member)]
    model = getattr(source, "model", None)
    return [model] if isinstance(model, torch.nn.Module) else []


class RewardAPI(ls.LitAPI):
    """The model process: one reward source on one device; each LitServe batch is one scoring call over the texts
    of all its requests, whose rewards are split back per request."""

    def __init__(self, config, spec, stats):
        super().__init__(max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout, spec=spec)
        self.config, self.stats = config, stats

    def setup(self, device) -> None:
        # Ctrl-C reaches the whole process group; the main process stops this one (SIGTERM) in its graceful shutdown
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.source = build_source(self.config, self.config.device, self.config.dtype)
        self.members = with_members(self.source)
        models = loaded_models(self.source)
        if models:  # an ensemble's members run the same forwards: /stats counts the first one's (per member)
            models[0].register_forward_pre_hook(self.count_forward, with_kwargs=True)

    def count_forward(self, module, args, kwargs) -> None:
        mask = kwargs["attention_mask"]
        self.add(forwards=1, tokens=int(mask.sum()), padded_tokens=mask.numel())

    def add(self, **counts) -> None:
        """Count into the shared array (written by this process only, read by the HTTP process's /stats)."""
        for key, value in counts.items():
            self.stats[STATS.index(key)] += value

    def decode_request(self, request, **kwargs):
        return request  # (token ids, token type ids or None), checked by RewardSpec

    def score(self, ids: list, types: list | None):
        """Per text: one reward, or (a source with members) the ``[E, N]`` member rewards."""
        if self.members:
            return self.source.table_ids(ids, types)
        return self.source.scorer.score_ids(ids, types)

    def predict(self, batch, **kwargs):
        requests = batch if self.max_batch_size > 1 else [batch]  # LitServe's single loop passes one request
        start = time.perf_counter()
        types = None if requests[0][1] is None else [t for _, ts in requests for t in ts]  # one tokenizer: all or none
        scored = self.score([ids for r, _ in requests for ids in r], types)
        seconds = time.perf_counter() - start
        texts = sum(len(r) for r, _ in requests)
        self.add(model_calls=1, requests=len(requests), texts=texts, predict_seconds=seconds)
        i = STATS.index("max_requests")
        self.stats[i] = max(self.stats[i], len(requests))
        out, start = [], 0
        for r, _ in requests:
            if self.members:  # the rule is per text: the summary of a request's columns is its own
                out.append(self.source.summary(scored[:, start : start + len(r)]))
            else:
                out.append(scored[start : start + len(r)])
            start += len(r)
        return out if self.max_batch_size > 1 else out[0]

    def encode_response(self, output, **kwargs):
        return output
