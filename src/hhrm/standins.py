"""Tiny stand-ins for the card's model families, built offline and deterministically from the embedded data.

    python -m hhrm.standins --data outputs/tiny/data --out outputs/standins

The card's recipes name three models, none of which can be downloaded here. Each stand-in keeps what makes its family
behave differently in hhrm (architecture, tokenizer rules, special tokens) and shrinks the rest:

- ``gpt_neo``: ``GPTNeoForCausalLM`` like EleutherAI/gpt-neo-2.7B (learned absolute positions, alternating global and
  local attention, tied embeddings) with a GPT-2 byte-level BPE tokenizer that, like GPT-Neo's, has
  ``<|endoftext|>`` as BOS, EOS and UNK, adds no special tokens, and has **no pad token**;
- ``open_llama``: ``LlamaForCausalLM`` like openlm-research/open_llama_3b, with a LLaMA tokenizer (SentencePiece-style
  BPE with byte fallback, ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2; prepends ``<s>``, no pad token);
- ``llama``: the same family for the LLaMA-7B chain (huggyllama/llama-7b ships the same tokenizer rules), with
  another seed, vocabulary and shape, so its tokenizer is not the open_llama stand-in's.

Each is a normal Hugging Face folder (model + tokenizer), skipped when already built with the same settings.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hhrm import formatting
from hhrm.reporting import read_jsonl

logger = logging.getLogger(__name__)

GPT_NEO_EOS = "<|endoftext|>"
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as LLaMA's SentencePiece model numbers them
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # LLaMA's byte-fallback pieces, ids 3..258


@dataclass
class GPTNeoSpec:
    """Sizes of the GPT-Neo stand-in. GPT-Neo-2.7B: 32 layers alternating global/local, window 256, 2,048 positions."""

    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 64
    num_heads: int = 4
    # (pattern, repeats): ["global", "local"] x 2 = 4 layers, both kinds present as in GPT-Neo
    attention_types: list = field(default_factory=lambda: [[["global", "local"], 2]])
    window_size: int = 16  # small, so that the fixtures' prompts are longer than the local window
    intermediate_size: int = 256
    max_position_embeddings: int = 2048  # learned positions: the card's max_length (1,024) must fit


@dataclass
class LlamaSpec:
    """Sizes of a LLaMA-family stand-in (open_llama_3b: 26 layers, hidden 3,200, 32 heads, vocabulary 32,000)."""

    seed: int = 1
    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 192
    max_position_embeddings: int = 2048


OPEN_LLAMA = LlamaSpec()
LLAMA_7B = LlamaSpec(seed=2, vocab_size=900, hidden_size=96, num_layers=3, num_heads=4, intermediate_size=256)


def training_texts(data: str | Path, limit: int = 4000) -> list[str]:
    """Chosen and rejected dialogues of the embedded data's train split, as the recipes render them."""
    rows = read_jsonl(Path(data) / "train.jsonl")
    return [formatting.rewrite_markers(r[k]) for r in rows[: limit // 2] for k in ("chosen", "rejected")]


def _bpe(texts: list[str], vocab_size: int, pre_tokenizer, special_tokens: list[str], initial_alphabet: list[str]):
    """``(vocab, merges)`` of a BPE trained on ``texts`` (deterministic: the trainer breaks ties by order)."""
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=initial_alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def gpt_neo_tokenizer(texts: list[str], vocab_size: int, max_length: int = 2048):
    """A GPT-2 byte-level BPE tokenizer (``GPT2Tokenizer``) trained on ``texts``: ``<|endoftext|>`` is BOS, EOS and
    UNK and the last id (GPT-2 numbers it 50256, after the merges); no pad token; adds no special tokens."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab, merges = _bpe(texts, vocab_size - 1, pre, [], pre_tokenizers.ByteLevel.alphabet())
    ordered = sorted(vocab, key=vocab.get)
    vocab = {piece: i for i, piece in enumerate(ordered)} | {GPT_NEO_EOS: len(ordered)}
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, add_prefix_space=False, model_max_length=max_length)
    assert tok.pad_token is None and tok.eos_token == tok.bos_token == tok.unk_token == GPT_NEO_EOS
    return tok


def llama_tokenizer(texts: list[str], vocab_size: int, max_length: int = 2048):
    """A LLaMA tokenizer (``LlamaTokenizer``: Metaspace ``▁``, BPE with byte fallback, BOS prepended, no EOS added)
    trained on ``texts``; ``<unk>``/``<s>``/``</s>`` are ids 0/1/2 and the 256 byte pieces follow; no pad token."""
    from tokenizers import pre_tokenizers
    from transformers import LlamaTokenizer

    # split: pieces never cross a word boundary, as SentencePiece trains them (the tokenizer itself does not split)
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    reserved = len(LLAMA_SPECIALS) + len(BYTE_TOKENS)
    trained, merges = _bpe(texts, vocab_size - reserved + len(LLAMA_SPECIALS), pre, list(LLAMA_SPECIALS), [])
    pieces = [p for p in sorted(trained, key=trained.get) if p not in LLAMA_SPECIALS]
    vocab = {piece: i for i, piece in enumerate((*LLAMA_SPECIALS, *BYTE_TOKENS, *pieces))}
    tok = LlamaTokenizer(
        vocab=vocab, merges=merges, model_max_length=max_length, add_bos_token=True, add_eos_token=False
    )
    assert tok.pad_token is None and tok("a")["input_ids"][0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    return tok


def build_gpt_neo(out: str | Path, texts: list[str], spec: GPTNeoSpec | None = None) -> Path:
    """A randomly initialised GPT-Neo and its tokenizer, saved to ``out``."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    spec = spec or GPTNeoSpec()
    tok = gpt_neo_tokenizer(texts, spec.vocab_size, spec.max_position_embeddings)
    num_layers = sum(len(kinds) * n for kinds, n in spec.attention_types)
    config = GPTNeoConfig(
        vocab_size=len(tok),
        max_position_embeddings=spec.max_position_embeddings,
        hidden_size=spec.hidden_size,
        num_layers=num_layers,
        attention_types=spec.attention_types,
        num_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        window_size=spec.window_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,  # as GPT-Neo
    )
    torch.manual_seed(spec.seed)
    return _save(GPTNeoForCausalLM(config), tok, out)


def build_llama(out: str | Path, texts: list[str], spec: LlamaSpec = OPEN_LLAMA) -> Path:
    """A randomly initialised LLaMA-family model (untied embeddings, as open_llama and LLaMA) and its tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    from hhrm.embedded import llama_config

    tok = llama_tokenizer(texts, spec.vocab_size, spec.max_position_embeddings)
    config = llama_config(
        tok,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(spec.seed)
    return _save(LlamaForCausalLM(config), tok, out)


def _save(model, tokenizer, out: str | Path) -> Path:
    """No pad id anywhere, as the card's checkpoints ship (their generation_config names none either)."""
    out = Path(out)
    model.generation_config.pad_token_id = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


BUILDERS = {
    "gpt_neo": lambda out, texts: build_gpt_neo(out, texts),
    "open_llama": lambda out, texts: build_llama(out, texts, OPEN_LLAMA),
    "llama": lambda out, texts: build_llama(out, texts, LLAMA_7B),
}


def ensure_standins(out: str | Path, data: str | Path, names: tuple[str, ...] = tuple(BUILDERS)) -> dict[str, Path]:
    """Build (or reuse) the stand-ins ``names`` under ``out`` from the embedded data at ``data``: name -> folder."""
    out = Path(out)
    wanted = {"gpt_neo": asdict(GPTNeoSpec()), "open_llama": asdict(OPEN_LLAMA), "llama": asdict(LLAMA_7B)}
    texts: list[str] | None = None
    paths = {}
    for name in names:
        folder, stamp = out / name, out / f"{name}.json"
        settings = {"spec": wanted[name], "data": str(Path(data).resolve())}
        if not (stamp.is_file() and json.loads(stamp.read_text()) == settings and folder.is_dir()):
            logger.info("building the %s stand-in in %s", name, folder)
            texts = texts if texts is not None else training_texts(data)
            BUILDERS[name](folder, texts)
            stamp.write_text(json.dumps(settings, indent=2) + "\n")
        paths[name] = folder
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="outputs/tiny/data", help="the embedded data (python -m hhrm.embedded)")
    parser.add_argument("--out", default="outputs/standins", help="folder for gpt_neo/, open_llama/ and llama/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (Path(args.data) / "train.jsonl").is_file():
        parser.error(f"--data {args.data}: no train.jsonl there; build the embedded data first (make embedded)")
    for name, folder in ensure_standins(args.out, args.data).items():
        print(f"{name} stand-in: {folder}")


if __name__ == "__main__":
    main()
