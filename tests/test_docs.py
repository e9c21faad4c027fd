"""The words agree with the code: every file the README and docs/ name exists, the README Layout names every
module under fastopd/ where it is, the formulas map of docs/formulas.md names files and functions that exist,
the README's API table gives each public signature as the code has it, and the demo configs hold the demo's
training settings."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from helpers import ROOT

import fastopd

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "results" / "README.md"])
TOP = ("fastopd", "tests", "benchmarks", "csrc", "configs", "scripts", "docs")
# a repository path in prose, code or a link: starts at a top folder, not inside a longer path or a URL
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*)" % "|".join(TOP))


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def _named_paths(text: str) -> set[str]:
    out = set()
    for m in PATH.finditer(text):
        path = m.group(1).rstrip(".,:;")
        if text[m.end(1):m.end(1) + 1] in "<*{":  # a pattern such as tests/test_<module>.py
            continue
        out.add(path)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_doc_names_exists(doc):
    text = doc.read_text(encoding="utf-8")
    missing = sorted(p for p in _named_paths(text) if not (ROOT / p).exists())
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"
    # relative links too (benchmarks/results/README.md links gpu/run2/, ../../docs/kernels.md)
    for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in link:
            assert (doc.parent / link).exists(), f"{doc.relative_to(ROOT)}: broken link {link}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_anchors_exist():
    for target, anchor in re.findall(r"\]\(([^)#\s]+)#([^)]+)\)", _readme()):
        headings = re.findall(r"^#+ (.+)$", (ROOT / target).read_text(encoding="utf-8"), flags=re.M)
        assert anchor in {_slug(h) for h in headings}, f"README links {target}#{anchor}: no such heading"


def _layout() -> str:
    text = _readme()
    section = text[text.index("## Layout"):]
    return re.search(r"```\n(.*?)```", section, flags=re.S).group(1)


def _layout_entries() -> tuple[set[str], dict[str, str]]:
    """(files named by full path, {folder entry such as 'fastopd/train/': the text of its entry})."""
    direct, folders, current = set(), {}, None
    for line in _layout().splitlines():
        if line[:1].strip():  # a new entry (or two on one line)
            current = None
            for path in re.findall(r"(?:^|\s{2})(fastopd/[\w/.]+)", line):  # entries start a column
                if path.endswith("/"):
                    current = path
                    folders[path] = line[line.index(path) + len(path):]
                else:
                    direct.add(path)
        elif current is not None:  # continuation of a folder entry
            folders[current] += " " + line.strip()
    return direct, folders


def test_readme_layout_names_every_module_where_it_is():
    direct, folders = _layout_entries()
    named = set(direct)
    for folder, text in folders.items():
        for name in re.findall(r"(?<![\w/.])([\w]+\.py)\b", text):
            assert (ROOT / folder / name).is_file(), f"README Layout: {folder}{name} does not exist"
            named.add(folder + name)
    for path in direct:
        assert (ROOT / path).is_file(), f"README Layout: {path} does not exist"
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fastopd").rglob("*.py")}
    missing = sorted(modules - named)
    assert not missing, f"the README Layout does not name: {missing}"


# ------------------------------------------------------------------------------------------ the formulas map
def _map_rows() -> list[str]:
    text = (ROOT / "docs" / "formulas.md").read_text(encoding="utf-8")
    return [line for line in text[:text.index("## Notation")].splitlines() if line.startswith("| ") and "§" in line]


def _defines(path: Path, chain: list[str]) -> bool:
    """Whether the module at ``path`` defines ``chain[0]`` (and its class ``chain[1]``), read without importing it
    (importing fastopd.kernels here would decorate the kernels outside the interpreter the kernel tests use)."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    for _ in chain:
        name, chain = chain[0], chain[1:]
        found = None
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                found = node
            elif isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
                return True
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return True
        if found is None:
            return False
        if not chain:
            return True
        body = found.body
    return True


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest module prefix: fastopd/<a>/<b>.py or its package
        base = ROOT / "fastopd" / Path(*parts[:i])
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return _defines(path, parts[i:])
    obj = fastopd  # a public name: fastopd.LMHead.from_model, OPDLoss.linear
    for part in parts[1:] if parts[0] == "fastopd" else parts:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def test_formulas_map_names_files_and_functions_that_exist():
    rows = _map_rows()
    assert len(rows) >= 15
    for row in rows:
        for token in re.findall(r"`([^`]+)`", row):
            name = token.split("(")[0]
            if "/" in name or name.endswith(".py"):
                path = name if name.split("/")[0] in TOP else "fastopd/" + name
                assert (ROOT / path).exists(), f"formulas map: {path} does not exist"
            elif "." in name:
                assert _resolves(name), f"formulas map: {name} is not defined"


@pytest.mark.parametrize("entry", ["token_stats", "segment_means", "bic_release", "release_weights", "ReleaseRule",
                                   "opd_loss", "LMHead", "linear_opd_loss", "sparse_margins", "online_release"])
def test_formulas_map_has_a_row_for_every_public_quantity(entry):
    assert any(f"`fastopd.{entry}`" in row for row in _map_rows()), entry


# ------------------------------------------------------------------------------------------ the API table
def _plain_signature(obj) -> str:
    sig = inspect.signature(obj)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values() if p.name != "self"]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def test_readme_api_table_gives_the_signatures_of_the_code():
    text = _readme()
    first_cells = [row.split(" | ")[0] for row in text[text.index("## API"):text.index("## Commands")].splitlines()
                   if row.startswith("| `")]
    calls = [c for cell in first_cells for c in re.findall(r"`((?:\w+\.)?\w+)(\([^`]*\))`", cell)]
    assert len(calls) >= 18
    for name, args in calls:
        obj = fastopd
        for part in name.split("."):
            obj = getattr(obj, part)
        assert args == _plain_signature(obj), f"README API table: {name}{args} != code {name}{_plain_signature(obj)}"
    public = {n for n in fastopd.__all__ if callable(getattr(fastopd, n)) and n[0].islower() or n in (
        "ReleaseRule", "OPDLoss", "LMHead", "OnlineRelease")}
    assert public <= {name for name, _ in calls}, public - {name for name, _ in calls}


def test_readme_commands_table_uses_flags_the_commands_take():
    from fastopd import cli, example

    text = _readme()
    table = text[text.index("## Commands"):text.index("## TRL")]
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    for command, rest in re.findall(r"`fastopd (\w+)([^`]*)`", table):
        parser = example.build_parser() if command == "example" else sub.get(command)
        if command == "bench":
            continue
        assert parser is not None, command
        known = {s for a in parser._actions for s in a.option_strings}
        for flag in re.findall(r"--[a-z][\w-]*", rest):
            assert flag in known or flag == "--FIELD", f"README: fastopd {command} has no {flag}"


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("config, task", [("demo_long.yaml", "long"), ("demo_release.yaml", "arithmetic")])
def test_demo_configs_hold_the_demos_training_settings(config, task, tmp_path):
    """configs/demo_*.yaml say "same training settings as `fastopd demo`": every field that changes what is
    trained equals the demo's release arm (output, logging, checkpoint and thread fields may differ)."""
    from fastopd.demo.demo import demo_config
    from fastopd.train.config import TrainConfig

    plumbing = {"output_dir", "overwrite", "save_every", "keep_last", "log_with", "num_threads", "progress",
                "eval_at_start", "eval_size"}
    paths = {"student", "teacher", "tokenizer", "train_data", "eval_data"}
    got = TrainConfig.from_yaml(ROOT / "configs" / config)
    want, _ = demo_config(tmp_path, quick=False, task=task)
    for f in dataclasses.fields(TrainConfig):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name in paths:
            assert (ROOT / a).resolve() == Path(b).resolve(), f.name
        elif f.name not in plumbing:
            assert a == b, f"configs/{config}: {f.name} = {a!r}, the demo's {task} task runs {b!r}"


# ------------------------------------------------------------------------------------------ the demo's numbers
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def test_training_doc_gives_the_readmes_measured_demo_times_and_the_arms_the_demo_trains():
    """docs/training.md's quick start states the demo's times as the README measured them (one measurement, two
    places), and the number of arms and steps the demo's schedules train."""
    from fastopd.demo.demo import SCHEDULES, schedule_arms

    readme = _readme()
    full_time = re.search(r"(\d+ min \d+ s) on the idle 2-core machine", readme).group(1)
    quick_time = re.search(r"`--quick` \(\d+ steps, \d+\s+problems, (\d+ s) idle\)", readme).group(1)
    doc = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    quick_line = next(line for line in doc.splitlines() if line.startswith("fastopd demo --quick "))
    full_line = next(line for line in doc.splitlines() if line.startswith("fastopd demo --out "))

    def arms(kind):
        return schedule_arms(SCHEDULES["long"][kind])

    assert f"# {quick_time} on an idle 2-core CPU" in quick_line, quick_line
    assert f"{full_time} on an idle 2-core CPU" in full_line, full_line
    for line, kind in ((quick_line, "quick"), (full_line, "full")):
        assert f"({len(arms(kind))} arms, {SCHEDULES['long'][kind]['steps']} steps)" in line, line
    assert f"trains {_NUMBER_WORDS[len(arms('full'))]} arms from the same student" in doc
    assert "runs OPD twice" not in doc and "about 10 minutes" not in doc
