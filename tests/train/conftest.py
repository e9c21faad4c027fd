"""Fixtures of the trainer's tests: one tiny random Qwen3 run folder (tests/tiny.py) for the whole session, and
one torch thread in every test (the tiny models are fastest so, and the numbers do not depend on the machine)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from tiny import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("tiny"), n_train=32, n_eval=4, teacher_extra_vocab=8)


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
