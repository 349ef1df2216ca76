"""Shared fixtures: tiny random checkpoints in the official format, the shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qguard.checkpoint import build_stream_model, open_checkpoint
from qguard.testing import make_gen_checkpoint, make_stream_checkpoint
from qguard.tokenizer import load_tokenizer

torch.set_num_threads(1)  # tests are small; one thread keeps runs steady on 2-core CI machines

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test: a fresh clone has no shared folder (CI does)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not found: this test needs the project's shared folder next to the repo (CI has it)")
    return p


@pytest.fixture(scope="session")
def tiny_stream(tmp_path_factory) -> Path:
    return make_stream_checkpoint(tmp_path_factory.mktemp("stream"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_gen(tmp_path_factory) -> Path:
    return make_gen_checkpoint(tmp_path_factory.mktemp("gen"), preset="tiny", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_stream):
    """(model, labels, tokenizer) of the tiny Stream checkpoint, float32 on the CPU, once per module."""
    model, labels = build_stream_model(open_checkpoint(tiny_stream), torch.device("cpu"), torch.float32)
    return model, labels, load_tokenizer(tiny_stream)
