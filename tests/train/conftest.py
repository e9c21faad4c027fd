"""Fixtures of the trainer's tests: one tiny random Qwen3 run folder (tests/tiny.py) for the whole session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from tiny import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("tiny"), n_train=32, n_eval=4, teacher_extra_vocab=8)
