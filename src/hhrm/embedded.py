"""Build the embedded default offline: generated data, a locally trained tokenizer, a tiny Llama.

    python -m hhrm.embedded --out outputs/tiny

writes ``data/{train,test}.jsonl`` (raw HH format, like Anthropic's release) and ``base/`` (a Hugging
Face model folder: tokenizer + randomly initialised ``LlamaForCausalLM``). Everything is
deterministic in ``--seed`` and is skipped when already built with the same settings.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from hhrm import formatting, synthetic
from hhrm.reporting import write_jsonl

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"eos_token": "<|endoftext|>", "pad_token": "<pad>", "bos_token": "<s>"}


@dataclass
class EmbeddedSpec:
    """Sizes of the embedded default. Changing any field rebuilds it."""

    seed: int = 0
    data_version: int = 3  # bump when hhrm.synthetic changes what it generates
    train_rows: int = 10000
    test_rows: int = 1000
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 512


def build_data(out: Path, spec: EmbeddedSpec) -> dict[str, list[dict]]:
    """Train and test rows from disjoint random streams of the same generator."""
    splits = {
        "train": synthetic.generate(spec.train_rows, seed=spec.seed),
        "test": synthetic.generate(spec.test_rows, seed=spec.seed + 1_000_003),
    }
    for name, rows in splits.items():
        write_jsonl(rows, out / f"{name}.jsonl")
    return splits


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """A byte-level BPE tokenizer trained on ``texts``; adds no special tokens by itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **SPECIAL_TOKENS)


def llama_config(
    tokenizer,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    vocab_size: int | None = None,
    **extra,
):
    """hhrm's one ``LlamaConfig`` builder: ``vocab_size`` defaults to ``len(tokenizer)``, the bos/eos/pad ids come
    from the tokenizer, embeddings are untied; ``extra`` goes to ``LlamaConfig`` as is (``attn_implementation``...)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer) if vocab_size is None else vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def build_base_model(out: Path, texts: list[str], spec: EmbeddedSpec) -> None:
    """Tokenizer + randomly initialised Llama, saved as a normal Hugging Face folder."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = train_tokenizer(texts, spec.vocab_size, spec.max_position_embeddings)
    config = llama_config(
        tokenizer,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_embedded(out: str | Path, spec: EmbeddedSpec | None = None) -> dict[str, Path]:
    """Build (or reuse) the embedded default under ``out``; returns the data and base-model folders."""
    spec = spec or EmbeddedSpec()
    out = Path(out)
    paths = {"data": out / "data", "base": out / "base"}
    stamp = out / "embedded.json"
    wanted = asdict(spec)
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and all(p.is_dir() for p in paths.values()):
        return paths
    logger.info("building the embedded default in %s", out)
    splits = build_data(paths["data"], spec)
    texts = [formatting.rewrite_markers(r[k]) for r in splits["train"] for k in ("chosen", "rejected")]
    build_base_model(paths["base"], texts, spec)
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/tiny", help="folder for data/ and base/")
    parser.add_argument("--seed", type=int, default=EmbeddedSpec.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = ensure_embedded(args.out, EmbeddedSpec(seed=args.seed))
    print(f"embedded default: data in {paths['data']}, base model in {paths['base']}")


if __name__ == "__main__":
    main()
