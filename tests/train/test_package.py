"""fastopd/train is the trainer a user imports; the paper's experiment (fastopd/demo) is built on it, never the
other way round. Checked twice: statically (every import statement of every module under fastopd/train) and
at run time (importing all of them loads no fastopd.demo module)."""

from __future__ import annotations

import ast
import subprocess
import sys

from helpers import ROOT

TRAIN = ROOT / "fastopd" / "train"


def demo_imports(source: str) -> list[str]:
    """The import statements of ``source`` that reach fastopd.demo (absolute or ``from fastopd import demo``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == "fastopd.demo" or a.name.startswith("fastopd.demo.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "fastopd.demo" or node.module.startswith("fastopd.demo."):
                found.append(node.module)
            elif node.module == "fastopd":
                found += [f"fastopd.{a.name}" for a in node.names if a.name == "demo"]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append("." * node.level + (node.module or ""))  # relative imports: none in this package
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("fastopd.demo"):
            found.append(node.value)  # importlib.import_module("fastopd.demo...") or a lazy-import table
    return found


def test_the_checker_sees_every_form_of_import():
    src = ("import fastopd.demo.task\nfrom fastopd.demo import demo\nfrom fastopd import demo\n"
           "def f():\n    from fastopd.demo.study import run_study\n"
           "_LAZY = {'x': 'fastopd.demo.task'}\nfrom .x import y\nimport fastopd.train.data\n")
    assert sorted(demo_imports(src)) == [".x", "fastopd.demo", "fastopd.demo", "fastopd.demo.study",
                                         "fastopd.demo.task", "fastopd.demo.task"]


def test_no_module_under_fastopd_train_imports_the_experiment():
    modules = sorted(TRAIN.rglob("*.py"))
    assert {p.name for p in modules} >= {"trainer.py", "rollouts.py", "models.py", "hidden.py", "config.py"}
    bad = {str(p.relative_to(ROOT)): demo_imports(p.read_text()) for p in modules}
    assert {k: v for k, v in bad.items() if v} == {}


def test_importing_the_trainer_loads_nothing_of_the_experiment():
    names = [f"fastopd.train.{p.stem}" for p in sorted(TRAIN.glob("*.py")) if p.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for n in {names!r}: importlib.import_module(n)\n"
            "import fastopd.train as t\n"
            "for n in t.__all__: getattr(t, n)\n"
            "print(sorted(m for m in sys.modules if m.startswith('fastopd.demo')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_module_of_the_trainer_is_over_450_lines():
    """Issue 21's bar: each module of fastopd/train does one thing a newcomer can read."""
    long = {p.name: n for p in TRAIN.glob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
