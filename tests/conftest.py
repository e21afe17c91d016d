"""Shared fixtures: the embedded default built once per session, small enough for tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test-first-half.jsonl.gz"
TEST_SPEC = dict(train_rows=800, test_rows=300)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """``{"data": folder with train/test.jsonl, "base": tiny Llama folder}`` (a smaller embedded default)."""
    from hhrm.embedded import EmbeddedSpec, ensure_embedded

    return ensure_embedded(tmp_path_factory.mktemp("tiny"), EmbeddedSpec(**TEST_SPEC))


@pytest.fixture(scope="session")
def hh_sample() -> Path:
    """The real HH-RLHF sample beside the project; tests using it skip where it is absent."""
    if not SHARED_HH.is_file():
        pytest.skip(f"real HH-RLHF sample not found at {SHARED_HH}")
    return SHARED_HH
