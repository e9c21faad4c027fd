"""Helpers shared by the test files (``tests/conftest.py`` puts this folder on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository root


def loss_inputs(seed, b=2, t=4, v=9, dtype=torch.float64):
    """Random float64 (B, T, V) student/teacher logits, targets (one ignored) and weights in [0, 2)."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, t, v, generator=g, dtype=dtype)
    zt = torch.randn(b, t, v, generator=g, dtype=dtype)
    y = torch.randint(0, v, (b, t), generator=g)
    y[1, -1] = -100
    w = torch.rand(b, t, generator=g, dtype=dtype) * 2
    return zs, zt, y, w
