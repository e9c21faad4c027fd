"""The ImportError of fastopd.integrations.trl names what went wrong (no TRL needed: subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _import_adapter(cwd, prelude=""):
    """Import fastopd.integrations.trl in a fresh interpreter run in ``cwd`` (first on sys.path, as a user's
    script folder is); this checkout's fastopd comes from PYTHONPATH. Returns the last stderr line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = prelude + "import fastopd.integrations.trl"
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_a_local_trl_py_shadowing_the_package_is_named(tmp_path):
    (tmp_path / "trl.py").write_text("# a user's own script that happens to be called trl.py\n")
    last = _import_adapter(tmp_path)
    assert last.startswith("ImportError: fastopd.integrations.trl could not import trl.DistillationTrainer: "
                           "ImportError: cannot import name 'DistillationConfig' from 'trl'"), last
    assert f"{tmp_path / 'trl.py'} is not the TRL package but a file that shadows it on sys.path" in last, last
    assert "needs TRL >=" not in last  # not the "not installed" message


def test_a_missing_trl_says_not_installed(tmp_path):
    from fastopd.integrations._trl_options import TRL_TESTED

    last = _import_adapter(tmp_path, prelude="import sys; sys.modules['trl'] = None\n")
    lo = "%d.%d" % TRL_TESTED[0]
    assert last == (f"ImportError: fastopd.integrations.trl needs TRL >= {lo}, which is not installed: "
                    "pip install 'fastopd[trl]'"), last


def test_an_error_inside_trl_is_passed_on_without_a_shadow_hint(tmp_path):
    # a package (trl/__init__.py) whose own import fails: its error, not "not installed", and no shadow hint
    (tmp_path / "trl").mkdir()
    (tmp_path / "trl" / "__init__.py").write_text("import a_dependency_that_is_missing\n")
    last = _import_adapter(tmp_path)
    assert last == ("ImportError: fastopd.integrations.trl could not import trl.DistillationTrainer: "
                    "ModuleNotFoundError: No module named 'a_dependency_that_is_missing'"), last
