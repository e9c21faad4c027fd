"""The package's import graph: no module imports itself back through others (function-level imports
included), and the library imports none of the trainer's dependencies (the ``train`` extra)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastopd"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _extensions() -> set[str]:
    """Compiled modules (``fastopd._C``): imported by name, they import nothing of the package."""
    return {_module_name(p.with_name(p.name.split(".")[0] + ".py")) for p in PACKAGE.rglob("*.so")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fastopd modules that ``name`` imports anywhere in its body (module level, functions, classes).

    ``from fastopd import x`` counts as an import of ``fastopd.x`` when that is a module, else of ``fastopd``;
    relative imports are resolved against the module's package.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.add(sub if sub in known else mod)
    out = set()
    for mod in found:
        # an import of a.b.c also runs a and a.b: count the deepest fastopd module named
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        if mod and mod != name:
            out.add(mod)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods) | _extensions()
    return {name: _imports(name, path, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_function_level_circle(tmp_path):
    """The checker itself: a circle closed only by an import inside a function is found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from fastopd.kernels import token_stats\n")
    assert "fastopd.kernels.token_stats" in _imports("fastopd.x", src, {"fastopd.kernels.token_stats", "fastopd.kernels"})


# Circles that run through the trainer, the demo or the integrations, which another branch restructures
# (issue 21): listed here so that this test still fails on any new circle. Each entry is a frozenset of the
# circle's modules.
KNOWN_OUTSIDE_LIBRARY: set[frozenset] = set()


def test_no_import_circle_in_fastopd():
    graph = import_graph()
    assert "fastopd.kernels.token_stats" in graph and graph["fastopd.kernels.token_stats"]  # the walk found imports
    remaining = {k: set(v) for k, v in graph.items()}
    cycles = []
    while (cycle := find_cycle(remaining)) is not None:
        cycles.append(cycle)
        remaining[cycle[-2]].discard(cycle[-1])  # break this edge and look for more
    unexpected = [c for c in cycles if frozenset(c) not in KNOWN_OUTSIDE_LIBRARY]
    assert not unexpected, "import circles: " + "; ".join(" -> ".join(c) for c in unexpected)


# The trainer's dependencies (the ``train`` extra of pyproject.toml) that the library must not need.
TRAIN_ONLY = ("transformers", "tokenizers", "accelerate", "tqdm", "matplotlib", "yaml", "safetensors")

_BLOCKED_RUN = textwrap.dedent(
    """
    import sys

    BLOCKED = set(sys.argv[1].split(","))

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Block())

    import numpy as np
    import torch

    import fastopd

    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    y = torch.randint(0, 11, (2, 6), generator=g)
    seg = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 3, 3]])
    zs.requires_grad_(True)
    out = fastopd.opd_loss(zs, zt, y, k=3)
    out.loss.backward()
    assert torch.isfinite(zs.grad).all()
    res = fastopd.bic_release(np.array([5.0, 5.1, 4.9, 0.1, 0.0, -0.1]), np.array([0, 6]), min_gain=-1e9)
    assert int(res.release_index[0]) == 3, res
    rule = fastopd.ReleaseRule(k=3, min_gain=-1e9)
    crit = fastopd.OPDLoss("reverse_kl", rule=rule)
    dec = crit(zs, zt, y, segment_ids=seg)
    assert dec.release is not None and torch.isfinite(dec.loss)
    h = torch.randn(2, 6, 4, generator=g, requires_grad=True)
    w = torch.randn(11, 4, generator=g)
    fastopd.linear_opd_loss(h, w, h.detach(), w, y, k=3).loss.backward()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("ok")
    """
)


def test_library_works_without_the_train_extra():
    """``import fastopd``, a loss call, the scan and the rule, with the train extra's packages unimportable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, ",".join(TRAIN_ONLY)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_blocked_import_is_really_blocked():
    """The finder of the test above does block: importing one of the packages fails under it."""
    code = _BLOCKED_RUN.split("import numpy as np")[0] + "import yaml\n"
    proc = subprocess.run([sys.executable, "-c", code, "yaml"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "No module named 'yaml' (blocked by the test)" in proc.stderr


@pytest.mark.parametrize("module", ["fastopd.train", "fastopd.demo", "fastopd.integrations"])
def test_init_does_not_import_the_trainer(module):
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)} | {
        a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert not any(m == module or m.startswith(module + ".") for m in top if m)


def test_cli_without_the_train_extra_says_which_extra_in_one_line():
    code = _BLOCKED_RUN.split("import numpy as np")[0] + (
        "from fastopd.cli import main\nsys.argv = ['fastopd', 'train', '--config', 'x.yaml']\nsys.exit(main())\n")
    proc = subprocess.run([sys.executable, "-c", code, ",".join(TRAIN_ONLY)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "fastopd[train]"' in lines[0] and "is not installed" in lines[0], lines


def test_pyproject_keeps_the_trainer_behind_its_extra():
    """The core dependencies hold none of the train extra's packages; ``dev`` (the README's install) pulls the
    train extra in; the extra's modules are the ones the CLI names and this file blocks."""
    import re
    import tomllib

    from fastopd.cli import TRAIN_EXTRA_MODULES

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.match(r"[A-Za-z0-9_.\-\[\]]+", r).group(0).lower() for r in reqs}

    core = names(project["dependencies"])
    train = names(project["optional-dependencies"]["train"])
    module = {"pyyaml": "yaml"}
    assert {module.get(n, n) for n in train} == set(TRAIN_EXTRA_MODULES) == set(TRAIN_ONLY)
    assert not core & train
    assert "fastopd[train]" in names(project["optional-dependencies"]["dev"])
