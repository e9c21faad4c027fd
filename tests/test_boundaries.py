"""Module boundaries (issue 14): who may reach the oracle and how, and the TRL adapter's import graph.

- the hidden-state path (fastopd/linear.py, fastopd/kernels/linear.py) uses only public functions of the
  oracle fastopd/reference.py: checked at run time, through a stand-in for the CPU dispatch that refuses
  every ``_``-prefixed attribute, over both losses, both gradient ways and the statistics;
- fastopd/release.py binds no oracle function at import: its segment means and weights look the reference up
  through ``cpu_ops`` at each call (a stand-in dispatch installed after import is what they call);
- the TRL adapter: ``_trl_gkd`` and ``trl`` do not import each other at module level (the shared options live
  in ``_trl_options``), and the option names are fastopd.common's.
"""

from __future__ import annotations

import ast
from types import SimpleNamespace

import pytest
import torch

import fastopd
from fastopd import LMHead, reference
from helpers import ROOT, grads, leaves, linear_segments, make_case

PKG = ROOT / "fastopd"


class PublicOnly:
    """The reference module, minus its private names: reading one is an error naming it."""

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AssertionError(f"fastopd.reference.{name} is private: the linear path must not call it")
        return getattr(reference, name)


def test_the_stand_in_refuses_private_names():
    with pytest.raises(AssertionError, match="fastopd.reference._stats is private"):
        PublicOnly()._stats  # noqa: B018
    assert PublicOnly().logprobs is reference.logprobs


@pytest.mark.parametrize("loss", ["pg", "reverse_kl"])
def test_linear_path_calls_only_public_reference_functions(loss, monkeypatch):
    import fastopd.linear as lin

    monkeypatch.setattr(lin, "cpu_ops", PublicOnly)
    c = make_case(21, lead=(3, 8), v=24, dtype=torch.float64)
    h, w, b = leaves(c)
    eager = fastopd.linear_opd_loss(h, LMHead(w, b, softcap=3.0), c["th"], c["tw"], c["y"], loss=loss, k=4,
                                    chunk_size=5, backend="reference")
    torch.autograd.grad(eager.loss, [h, w, b], retain_graph=True)  # the eager gradient
    coef = torch.linspace(-1, 2, c["y"].numel(), dtype=torch.float64).view(c["y"].shape)
    grads((eager.per_token * coef).sum(), [h, w, b])  # not sigma * w: the recompute
    crit = fastopd.OPDLoss(loss, rule=fastopd.ReleaseRule(k=4, backend="reference"))
    out = crit.linear(h, w, c["th"], c["tw"], c["y"], segment_ids=linear_segments((3, 8), 21), chunk_size=5)
    grads(out.loss, [h, w])
    fastopd.linear_token_stats(h, w, c["th"], c["tw"], c["y"], k=4, chunk_size=5, full_kl=True, backend="reference")


def _top_level_imports(path) -> list[str]:
    """Modules imported by the module-level statements of ``path`` (not inside functions)."""
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Try):  # a guarded import at module level
            nodes = node.body + [s for h in node.handlers for s in h.body]
        else:
            nodes = [node]
        for n in nodes:
            if isinstance(n, ast.Import):
                found += [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                found += [f"{n.module}.{a.name}" for a in n.names]
    return found


def test_linear_and_release_import_no_oracle_function():
    for rel in ("linear.py", "kernels/linear.py", "release.py"):
        imported = _top_level_imports(PKG / rel)
        assert not [m for m in imported if m.startswith("fastopd.reference")], (rel, imported)


def test_release_looks_the_reference_up_at_call_time(monkeypatch):
    import fastopd.release as rel

    calls = []
    stand_in = SimpleNamespace(
        segment_means=lambda *a, **k: calls.append("segment_means") or "means",
        release_weights=lambda *a, **k: calls.append("release_weights") or "weights",
        control_weights=lambda *a, **k: calls.append(("control_weights", a[0], k)) or "control",
    )
    monkeypatch.setattr(rel, "cpu_ops", lambda: stand_in)
    assert rel.segment_means(None, None, None) == "means"
    assert rel.release_weights(None, None, None) == "weights"
    assert fastopd.control_weights("random", None, None, fraction=0.3, generator=5) == "control"
    assert calls == ["segment_means", "release_weights",
                     ("control_weights", "random", dict(fraction=0.3, generator=5, kept_fractions=None))]
    monkeypatch.undo()
    seg = torch.tensor([[0, 0, 1, 1]])
    valid = torch.ones_like(seg, dtype=torch.bool)
    assert torch.equal(fastopd.release_weights(seg, valid, [1]), reference.release_weights(seg, valid, [1]))


def test_trl_adapter_has_no_import_circle_and_takes_option_names_from_common():
    integ = PKG / "integrations"
    assert not [m for m in _top_level_imports(integ / "trl.py") if "_trl_gkd" in m]
    gkd = _top_level_imports(integ / "_trl_gkd.py")
    assert not [m for m in gkd if m.startswith("fastopd.integrations.trl")], gkd
    options = _top_level_imports(integ / "_trl_options.py")
    assert "fastopd.common.MODES" in options and "fastopd.common.LOSSES" in options
    assert not [m for m in options if m.startswith(("trl", "fastopd.integrations.trl", "fastopd.reference"))]
    source = (integ / "trl.py").read_text()
    assert "_FORCE_LOGITS_PATH" not in source and "interim" not in source.lower()
