"""Shared fixtures: the embedded default built once per session, small enough for tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
# The real HH-RLHF sample (Anthropic's raw jsonl[.gz]) is named by an environment variable, never assumed.
HH_SAMPLE = os.environ.get("HHRM_HH_SAMPLE", "")
TEST_SPEC = dict(train_rows=800, test_rows=300)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """``{"data": folder with train/test.jsonl, "base": tiny Llama folder}`` (a smaller embedded default)."""
    from hhrm.embedded import EmbeddedSpec, ensure_embedded

    return ensure_embedded(tmp_path_factory.mktemp("tiny"), EmbeddedSpec(**TEST_SPEC))


@pytest.fixture(scope="session")
def hh_sample() -> Path:
    """The real HH-RLHF sample named by ``HHRM_HH_SAMPLE``; tests using it skip where it is not set or absent."""
    if not HH_SAMPLE or not Path(HH_SAMPLE).is_file():
        pytest.skip(f"real HH-RLHF sample not available (HHRM_HH_SAMPLE={HH_SAMPLE!r}): set it to a raw jsonl(.gz)")
    return Path(HH_SAMPLE)


def load_recipe(name: str):
    """``recipes/<name>.py`` as a module, so a test calls its ``main`` with config objects."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
