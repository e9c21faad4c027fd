"""Tests of fastopd._dispatch: which backend runs for which tensors."""

from __future__ import annotations

import torch



def test_auto_backend_choice():
    from fastopd._dispatch import resolve_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", cpu, dtypes=(torch.bfloat16,)) == "reference"
    assert resolve_backend("auto", cuda, dtypes=(torch.bfloat16, torch.float32), k=16) == "triton"
    # the kernels take fp16/bf16/fp32 and k <= 256: auto hands anything else to the reference
    assert resolve_backend("auto", cuda, dtypes=(torch.float64, torch.float32)) == "reference"
    assert resolve_backend("auto", cuda, dtypes=(torch.bfloat16,), k=512) == "reference"
    assert resolve_backend("reference", cuda) == "reference"
