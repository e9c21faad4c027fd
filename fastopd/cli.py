"""The ``fastopd`` command (also ``python -m fastopd``).

    fastopd demo [--quick] [--out DIR]      CPU demo: OPD with and without the release rule, table + plots
    fastopd study [--seeds N] [--out DIR]   the rule against every control over several seeds (resumable)
    fastopd example [...]                   the release rule on one rollout, segment by segment
    fastopd train --config cfg.yaml [...]   on-policy distillation of any Hugging Face causal LM pair
    fastopd report RUN_DIR [...] --out DIR  plots of finished runs
    fastopd bench [NAME] [...]              run a script of benchmarks/ (source checkout)
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path

DESCRIPTION = """\
fastopd: on-policy distillation (OPD) with the "Prefix Teach, Suffix Fade" release rule.

The student samples its own answers, the teacher scores every token, and the release rule
keeps the teacher's feedback only on the prefix of each answer where it is still teachable.
"""

EPILOG = """\
start here:
  fastopd demo --quick          the short CPU demo on the shipped tiny models (no download)
  fastopd demo                  the full demo
  fastopd study                 the release rule against every control, over several seeds
  fastopd example               watch the release rule decide on one rollout
  fastopd train --config configs/demo_release.yaml
                                train from a YAML config; any field can be overridden by a flag
  fastopd train --help          every training option, with its default

multi-GPU: accelerate launch --num_processes 8 -m fastopd train --config cfg.yaml
docs: docs/training.md
"""


# ----------------------------------------------------------------------------------------------------------
# train: flags generated from TrainConfig
# ----------------------------------------------------------------------------------------------------------


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, ``--max-new-tokens`` for ``max_new_tokens`` (default SUPPRESS, so that
    only the flags given on the command line override the YAML file). ``main`` also accepts the field's own
    spelling ``--max_new_tokens``."""
    import dataclasses

    from fastopd.train.config import TrainConfig, field_docs

    hints = typing.get_type_hints(TrainConfig)
    docs = {name: text for name, _, text in field_docs()}
    group = parser.add_argument_group("config fields (override the YAML file)")
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        names = [f"--{f.name.replace('_', '-')}"]
        help_text = docs[f.name].replace("%", "%%")
        if "Required" not in help_text and "(default" not in help_text:
            help_text += f" (default: {f.default!r})"
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if hint is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        kind = {int: int, float: float, str: str}.get(base, str)
        if type(None) in args:
            kind = _none_or(kind)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(*names, type=kind, metavar=f.name.upper(), **kwargs)


def build_config(args: argparse.Namespace):
    """TrainConfig from ``--config`` (if any) with every explicitly given flag on top."""
    from fastopd.train.config import TrainConfig

    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    if args.config:
        return TrainConfig.from_yaml(args.config, overrides)
    return TrainConfig.from_dict(overrides, source="command line")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    cfg.validate()
    from fastopd.train.trainer import eval_line, train

    summary = train(cfg)
    ev = summary["eval"]
    if ev is not None:
        print(eval_line(summary["step"], ev, cfg))
    print(f"done: {summary['output_dir']} (final model in final/, logs in metrics.jsonl)")
    return 0


# ----------------------------------------------------------------------------------------------------------
# the other commands
# ----------------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from fastopd.demo.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, steps=args.steps, progress=not args.no_progress,
             num_threads=args.threads, loss=args.loss, lr=args.lr, task=args.task, jobs=args.jobs)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from fastopd.demo.study import run_study

    run_study(args.out, seeds=args.seeds, steps=args.steps, task=args.task, arms=tuple(args.arms),
              progress=not args.no_progress, num_threads=args.threads, jobs=args.jobs, eval_every=args.eval_every)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fastopd.train.report import make_report

    runs = {Path(d).name: d for d in args.runs}
    for p in make_report(runs, args.out, min_gain=args.min_gain):
        print(p)
    return 0


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark_summary(path: Path) -> str:
    """The first line of a benchmark script's module docstring (read without running it), or "" when it has none."""
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    return doc.strip().splitlines()[0] if doc else ""


def cmd_bench(argv: list[str]) -> int:
    import runpy

    bench = benchmarks_dir()
    scripts = sorted(p.stem for p in bench.glob("*.py") if not p.name.startswith("_")) if bench.is_dir() else []
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fastopd bench NAME [ARGS...]\n\nRuns benchmarks/NAME.py (needs a source checkout); "
              "fastopd bench NAME --help for its options.\n")
        if not scripts:
            print(f"available: none found in {bench}")
        width = max(map(len, scripts), default=0)
        for name in scripts:  # the first line of each script's docstring: what it measures, and where it runs
            print(f"  {name:<{width}}  {benchmark_summary(bench / f'{name}.py')}")
        return 0
    name = argv[0].removesuffix(".py")
    if name not in scripts:
        print(f"unknown benchmark {name!r}; available: {', '.join(scripts) or 'none'}", file=sys.stderr)
        return 2
    old_argv = sys.argv
    sys.argv = [str(bench / f"{name}.py"), *argv[1:]]
    try:
        runpy.run_path(str(bench / f"{name}.py"), run_name="__main__")
    finally:
        sys.argv = old_argv
    return 0


def cmd_example(argv: list[str]) -> int:
    from fastopd import example

    result = example.main(argv)
    return result if isinstance(result, int) else 0


def _dashed(arg: str) -> str:
    """``--max_new_tokens=3`` -> ``--max-new-tokens=3`` (config fields may be spelled either way)."""
    if not arg.startswith("--"):
        return arg
    flag, eq, value = arg.partition("=")
    return flag.replace("_", "-") + eq + value


PASSTHROUGH = {"example": cmd_example, "bench": cmd_bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastopd", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from fastopd import __version__

    parser.add_argument("--version", action="version", version=f"fastopd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from fastopd.demo import check_task, long_task, task
    from fastopd.demo.demo import COMMON, DEFAULT_THREADS, SCHEDULES

    def per_schedule(key: str) -> str:  # "arithmetic 200 (quick 60), long 50 (quick 15)", read from SCHEDULES
        def text(name: str, s: dict) -> str:
            values = (s[kind].get(key, COMMON.get(key)) for kind in ("full", "quick"))
            full, quick = (v if isinstance(v, str) else format(v, "g") for v in values)
            return f"{name} {full}" + ("" if quick == full else f" (quick {quick})")

        return ", ".join(text(name, s) for name, s in SCHEDULES.items())

    p = sub.add_parser("demo", help="CPU demo: OPD with and without the release rule on the shipped tiny models",
                       description="Runs OPD from the same tiny student and seed with every token supervised (full) "
                       "and with the release rule (and the schedule's other arms: on --task check the rule's matched "
                       "controls, a fixed cut of the same mean kept fraction and, beside online release, a fixed "
                       "length budget of the same mean length), and prints teacher/student "
                       "accuracy, tokens supervised and time per step; writes table.md, table.json and PNG plots to "
                       "--out. No download.")
    p.add_argument("--quick", action="store_true", help="the short schedule (fewer steps)")
    p.add_argument("--task", choices=tuple(SCHEDULES), default="long",
                   help="long: %d-%d-sentence answers whose check the teacher may phrase freely (default); "
                   "arithmetic: the short %d-%d-sentence task; check: %d-%d-sentence answers whose check has a "
                   "length the prompt sets, often none (the fade's place varies; models in fastopd/assets/"
                   "demo_check)" % (*long_task.SENTENCES, *task.SENTENCES, *check_task.SENTENCES))
    p.add_argument("--out", default="fastopd-demo", help="report folder (default: ./fastopd-demo)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps per arm (default, per task: {per_schedule('steps')})")
    p.add_argument("--seed", type=int, default=0, help="seed of every arm (default 0)")
    p.add_argument("--loss", choices=("reverse_kl", "forward_kl", "pg"), default=None,
                   help=f"loss of every arm (default, per task: {per_schedule('loss')}; the exact divergences are "
                   "the lowest-variance choice for the tiny student)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate of every arm (default, per task: {per_schedule('lr')})")
    p.add_argument("--threads", type=int, default=0,
                   help=f"torch CPU threads per arm (default {DEFAULT_THREADS}: fastest for the tiny demo models)")
    p.add_argument("--jobs", type=int, default=0,
                   help="arms trained at once, one process each (default 0: one per CPU core, at most 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    from fastopd.demo.study import ARMS

    p = sub.add_parser("study", help="the release rule against every control, several seeds (resumable)",
                       description="Trains every arm (" + ", ".join(ARMS) + "; fixed_prefix at the release arm's "
                       "kept fraction) for every seed from the same shipped student, grades each "
                       "final student on both tasks, and writes study.json, study.md and plots to --out. A run "
                       "that has finished (result.json) is not rerun.")
    p.add_argument("--out", default="fastopd-study", help="study folder (default: ./fastopd-study)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1; default 3)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the demo's schedule)")
    p.add_argument("--task", choices=tuple(SCHEDULES), default="long",
                   help="in-domain task (default long; check: the task where the fade's place varies, with "
                   "fixed_prefix at the precondition's kept fraction, accuracy split by problems with and without "
                   "a check, and per-problem paired intervals)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to run (release is required)")
    p.add_argument("--threads", type=int, default=0, help=f"torch CPU threads per run (default {DEFAULT_THREADS})")
    p.add_argument("--eval-every", type=int, default=None,
                   help="greedy evaluation every this many steps of each run (default: the demo's schedule)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each (default 1; "
                   "one per CPU core is the fastest setting)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_study)

    sub.add_parser("example", help="the release rule on one built-in rollout (fastopd example --help)",
                   add_help=False)

    p = sub.add_parser("train", help="on-policy distillation of a Hugging Face causal LM pair",
                       usage="fastopd train [--config CFG.yaml] [--FIELD VALUE ...] [--print-config]",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a student by on-policy distillation from a teacher.\n\n"
                       "  fastopd train --config cfg.yaml                 # fields from YAML\n"
                       "  fastopd train --config cfg.yaml --lr 1e-5       # a flag overrides the file\n"
                       "  fastopd train --student Qwen/Qwen3-0.6B --teacher Qwen/Qwen3-8B \\\n"
                       "      --train-data prompts.jsonl --output-dir runs/x\n"
                       "  fastopd train --config cfg.yaml --resume        # continue the run in output_dir\n"
                       "  accelerate launch --num_processes 8 -m fastopd train --config cfg.yaml\n\n"
                       "Prompts: JSONL lines {\"prompt\": ..., \"answer\": ...} (answer optional, used for "
                       "accuracy) or a datasets folder. See docs/training.md.")
    p.add_argument("--config", "-c", default=None, help="YAML file of config fields (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="plots (margins, BIC gains, release positions, curves) of finished runs")
    p.add_argument("runs", nargs="+", help="run folders (trainer output_dir; log_rollouts=true for margin plots)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--min-gain", type=float, default=10.0, help="threshold line of the gain histogram")
    p.set_defaults(func=cmd_report)

    sub.add_parser("bench", help="run a benchmark script of benchmarks/ (fastopd bench --help)", add_help=False)
    return parser


USER_ERRORS = (ValueError, OSError)
"""What a command reports as one line instead of a traceback: a bad setting or damaged file (ValueError, with
json.JSONDecodeError and the config's YAML errors) and the file system's answers (OSError: a missing file, a
path under a file, no permission, a full disk). Anything else is a bug and keeps its traceback;
FASTOPD_DEBUG=1 shows the traceback of these too."""

# Modules of the ``train`` extra (pyproject.toml): the library runs without them, the commands do not.
TRAIN_EXTRA_MODULES = ("transformers", "tokenizers", "accelerate", "tqdm", "matplotlib", "yaml", "safetensors")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in TRAIN_EXTRA_MODULES or os.environ.get("FASTOPD_DEBUG"):
            raise
        print(f"fastopd: error: the command needs the train extra ({missing} is not installed): "
              'pip install "fastopd[train]"', file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    if argv and argv[0] in PASSTHROUGH:
        command, func, args = argv[0], PASSTHROUGH[argv[0]], argv[1:]
    else:
        parser = build_parser()
        parsed = parser.parse_args([_dashed(a) for a in argv])
        if getattr(parsed, "func", None) is None:
            parser.print_help()
            return 0
        command, func, args = parsed.command, parsed.func, parsed
    try:
        return func(args)
    except USER_ERRORS as e:
        if os.environ.get("FASTOPD_DEBUG"):
            raise
        print(f"fastopd {command}: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
