#!/usr/bin/env python
"""Rebuild the embedded CPU demo assets of fastopd from scratch: tokenizer, teacher, student.

    python scripts/build_demo_assets.py            # writes fastopd/assets/demo/{tokenizer,teacher,student,data,...}
    python scripts/build_demo_assets.py --readme-only   # rewrite README.md from build.json
    python scripts/build_demo_assets.py --task check    # the check task's models -> fastopd/assets/demo_check/

``--task check`` (:mod:`fastopd.demo.check_task`, the task where the fade's position varies) builds a teacher and a
student for that task mixed with the arithmetic task, into its own folder; the shipped ``fastopd/assets/demo``
is not touched. Its defaults (``CHECK_DEFAULTS``): the demo tokenizer is reused (``--tokenizer``; every number
and word of the check task is in its vocabulary), the teacher starts from the shipped long-task teacher's
weights (``--init-teacher``: the derivation is the long task's) and is trained by the slip stage only, on the
check task; the student is trained from scratch as the long task's was. ``--part teacher`` / ``--part student``
run one model's stages alone (two processes at once on two cores) and ``--part finish`` then re-measures,
writes the prompt files, build.json and README.md.

Everything is deterministic given the seeds below (two builds wrote byte-identical files) and runs on CPU with
1 torch thread: 15.7 min on the project's shared 2-core machine at load average ~2-3, 38.6 min at 6-7.

1. a byte-level BPE tokenizer (``tokenizers``) trained on the text of both tasks, saved as a
   ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` (EOS) and ``<|pad|>`` (PAD);
2. a tiny Qwen3 teacher trained by SFT (loss on the solution tokens + EOS only) on a mix of the long task
   (:mod:`fastopd.demo.long_task`, ``--long-fraction`` 0.75) and the arithmetic task (:mod:`fastopd.demo.task`);
3. a smaller Qwen3 student trained by the same SFT for fewer steps; of its checkpoints the one whose
   long-task validation accuracy is nearest ``--student-target`` is kept, so it writes well-formed long
   solutions but gets few answers right;
4. both models saved with ``save_pretrained(safe_serialization=True)`` with weights in bf16 (a few MB) and
   ``config.dtype = "float32"``, so that a plain ``AutoModelForCausalLM.from_pretrained(path)`` gives an
   fp32 CPU model; the script re-loads them that way and re-measures accuracy on 200 held-out problems of
   each task;
5. the prompt files of both tasks (``data/``) and ``build.json`` / ``README.md`` with the numbers.

Both tasks are graded by :func:`fastopd.train.verify.boxed_match`.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Sequence

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastopd.demo.task import (  # noqa: E402
    EVAL_SEED, TRAIN_SEED, MAX_ADD, MAX_MUL, MAX_START, MAX_VALUE,
    format_prompt, make_problems, solution_completion, write_jsonl,
)
from fastopd.demo import check_task, long_task  # noqa: E402
from fastopd.train.verify import boxed_match  # noqa: E402

EOS, PAD = "<|endoftext|>", "<|pad|>"
LONG_MAX_NEW_TOKENS = 192  # the longest long-task solution is 160 tokens with the shipped tokenizer
VAL_SEED = 777  # validation problems (split "eval", disjoint from the final 200 by construction below)

TEACHER_CFG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32)
# The student: 334k parameters. The first demo student (hidden 64, intermediate 256, head_dim 16: 161k) was too
# small for OPD to teach (docs/training.md, "Why distillation did not teach").
STUDENT_CFG = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=24)

TASKS = {"long": long_task, "check": check_task}
TASK = long_task
"""The in-domain task module of this build (``--task``; the other task of the mix is always the arithmetic one)."""
CHECK_DEFAULTS = dict(out=ROOT / "fastopd" / "assets" / "demo_check", tokenizer=ROOT / "fastopd" / "assets" / "demo"
                      / "tokenizer", init_teacher=ROOT / "fastopd" / "assets" / "demo" / "teacher",
                      init_student=ROOT / "fastopd" / "assets" / "demo" / "student",
                      teacher_slip_steps=200, teacher_slip_lr=1.5e-3, teacher_slip_evals=2)
"""``--task check``'s defaults where an argument is not given."""
CHECK_STUDENT_ARGS = "--student-lr 1e-3 --student-steps 120 --student-eval-every 60 --student-stop 2 --student-target 0.45"
CHECK_BUILD_COMMANDS = [
    "python scripts/build_demo_assets.py --task check --part teacher &",
    f"python scripts/build_demo_assets.py --task check --part student {CHECK_STUDENT_ARGS}",
    "wait",
    f"python scripts/build_demo_assets.py --task check --part finish --n-eval 400 {CHECK_STUDENT_ARGS}",
]
"""How fastopd/assets/demo_check was built (the two parts at once, then the finish)."""


# ----------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(vocab_size: int, seed: int):
    """Byte-level BPE on task text, wrapped as a transformers fast tokenizer with EOS/PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    problems = mixed_problems(20000, seed, split="train", long_fraction=0.5)
    texts = [format_prompt(p["prompt"]) + solution_completion(p) for p in problems]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                 model_max_length=256, clean_up_tokenization_spaces=False)
    # every value the task can produce must be one token in both contexts (" 42" and "{42}")
    split = [n for n in range(MAX_VALUE + 1)
             if len(hf(f" {n}")["input_ids"]) != 1 or len(hf(f"{{{n}")["input_ids"]) != 2]
    if split:
        print(f"WARNING: numbers split into several tokens: {split}", flush=True)
    return hf


# ----------------------------------------------------------------------------------------- data
def mixed_problems(n: int, seed: int, *, split: str, long_fraction: float):
    """``n`` training problems: a ``long_fraction`` of the long task (fastopd.demo.long_task), the rest of the
    arithmetic task (fastopd.demo.task), shuffled together deterministically."""
    n_long = int(round(n * long_fraction))
    rows = (TASK.make_problems(n_long, seed, split=split, unique=False)
            + make_problems(n - n_long, seed, split=split, unique=False))
    random.Random(f"mix/{seed}/{split}").shuffle(rows)
    return rows


def is_long(problem: Dict[str, str]) -> bool:
    return problem["prompt"].startswith("Find the sum of ")


def encode_sft(tok, problems: Sequence[Dict[str, str]], *, slips: float = 0.0, seed: int = 0):
    """(input_ids, labels) per problem: labels are -100 on the prompt, the solution tokens + EOS after it.

    ``slips`` > 0: half of the long-task examples get student-like slips in their derivation
    (:func:`fastopd.demo.long_task.slipped_solution`, each sentence with probability ``slips``), with the
    slipped numbers left out of the loss, so the model learns to continue soundly after a slip without ever
    learning to make one (the teacher; docs/training.md, "Why distillation did not teach")."""
    rng = random.Random(f"slips/{seed}")
    prompts = tok([format_prompt(p["prompt"]) for p in problems])["input_ids"]
    out = []
    for p, prob in zip(prompts, problems):
        spans = []
        if slips > 0 and is_long(prob) and rng.random() < 0.5:
            text, spans = TASK.slipped_solution(prob, rng, slips)
            text = " " + text
            spans = [(a + 1, b + 1) for a, b in spans]
        else:
            text = solution_completion(prob)
        enc = tok(text, return_offsets_mapping=bool(spans))
        s = enc["input_ids"] + [tok.eos_token_id]
        labels = list(s)
        for j, (a, b) in enumerate(enc["offset_mapping"] if spans else []):
            if any(a < e and b > st for st, e in spans):
                labels[j] = -100
        out.append((p + s, [-100] * len(p) + labels))
    return out


def collate(rows, pad_id: int):
    """Right-pad a list of (ids, labels) into input_ids / attention_mask / labels tensors."""
    n = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), n), -100, dtype=torch.long)
    att = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)] = torch.tensor(x)
        lab[i, :len(y)] = torch.tensor(y)
        att[i, :len(x)] = 1
    return ids, att, lab


# ----------------------------------------------------------------------------------------- models
def make_model(cfg: Dict, tok, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tok), max_position_embeddings=320, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         rope_theta=10000.0, rms_norm_eps=1e-6, attention_dropout=0.0, use_cache=True, **cfg)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings are counted once


@torch.no_grad()
def greedy_accuracy(model, tok, problems, batch_size: int = 100, max_new_tokens: int | None = None,
                    return_completions: bool = False):
    """Fraction of problems whose greedy completion passes boxed_match (left-padded batched generate)."""
    if max_new_tokens is None:
        max_new_tokens = LONG_MAX_NEW_TOKENS if any(is_long(p) for p in problems) else 64
    model.eval()
    tok.padding_side = "left"
    correct, comps = 0, []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        enc = tok([format_prompt(p["prompt"]) for p in chunk], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for p, t in zip(chunk, texts):
            correct += boxed_match(t, p["answer"])
        comps.extend(texts)
    tok.padding_side = "right"
    model.train()
    acc = correct / max(1, len(problems))
    return (acc, comps) if return_completions else acc


def sft(model, tok, *, steps: int, batch_size: int, lr: float, seed: int, desc: str,
        eval_every: int = 0, val_problems=None, warmup: int = 50, min_lr_frac: float = 0.1,
        stop_at: float = 2.0, long_fraction: float = 0.75, ood_val_problems=None, snapshot_dir=None,
        slips: float = 0.0):
    """SFT with AdamW + linear warmup + cosine decay; loss on solution tokens only.

    Every ``eval_every`` steps (and at the end) greedy accuracy on ``val_problems`` is measured and the
    weights are snapshotted; returns the list of (step, val_acc, state_dict). Training stops early once
    the validation accuracy reaches ``stop_at``.
    """
    problems = mixed_problems(steps * batch_size, seed, split="train", long_fraction=long_fraction)
    rows = encode_sft(tok, problems, slips=slips, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))

    snaps = []
    model.train()
    bar = tqdm(range(steps), desc=desc, mininterval=15, file=sys.stdout)
    ema = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, att, lab = collate(rows[step * batch_size:(step + 1) * batch_size], tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr_at(step):.2e}", refresh=False)
        last = step == steps - 1
        if val_problems is not None and ((eval_every and (step + 1) % eval_every == 0) or last):
            acc = greedy_accuracy(model, tok, val_problems)
            ood = greedy_accuracy(model, tok, ood_val_problems) if ood_val_problems else float("nan")
            snaps.append((step + 1, acc, copy.deepcopy(model.state_dict()), ood))
            if snapshot_dir is not None:  # the latest validated weights, to inspect while training goes on
                model.save_pretrained(snapshot_dir, safe_serialization=True)
            print(f"  [{desc}] step {step + 1}: loss {ema:.4f} val_acc {acc:.3f} (arithmetic {ood:.3f})", flush=True)
            if acc >= stop_at:
                break
    bar.close()
    return snaps


def save_model(model, tok_dir: Path, path: Path, save_dtype: torch.dtype):
    """save_pretrained in ``save_dtype`` (safetensors) + a copy of the tokenizer files of ``tok_dir``;
    config.dtype says float32 so that a plain from_pretrained(path) loads an fp32 model (upcast) for CPU."""
    if path.exists():
        shutil.rmtree(path)
    m = copy.deepcopy(model).to(save_dtype)
    m.save_pretrained(path, safe_serialization=True)
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in tok_dir.iterdir():  # copy the files, not a re-save that would carry padding state
        shutil.copy2(f, path / f.name)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="long",
                    help="the in-domain task: long (fastopd.demo.long_task, the shipped assets) or check "
                         "(fastopd.demo.check_task; defaults CHECK_DEFAULTS, into fastopd/assets/demo_check)")
    ap.add_argument("--part", choices=["all", "teacher", "student", "finish"], default="all",
                    help="teacher / student: only that model's stages (results to build_<part>.json); finish: "
                         "re-measure both, write data, build.json, README.md")
    ap.add_argument("--tokenizer", type=Path, default=None, help="copy this tokenizer folder instead of training one")
    ap.add_argument("--init-teacher", type=Path, default=None,
                    help="start the teacher from this model folder's weights and run the slip stage only")
    ap.add_argument("--teacher-slip-evals", type=int, default=1, help="validation points along the slip stage")
    ap.add_argument("--init-student", type=Path, default=None,
                    help="start the student from this model folder's weights instead of a random initialisation")
    ap.add_argument("--out", type=Path, default=None, help="default fastopd/assets/demo (--task check: demo_check)")
    ap.add_argument("--vocab-size", type=int, default=640)
    ap.add_argument("--long-fraction", type=float, default=0.75,
                    help="fraction of SFT examples from the long task (the rest: the arithmetic task)")
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--teacher-lr", type=float, default=3e-3)
    ap.add_argument("--teacher-batch", type=int, default=32)
    ap.add_argument("--teacher-evals", type=int, default=4, help="validation points along the teacher's SFT")
    ap.add_argument("--teacher-slip-steps", type=int, default=None,
                    help="steps of the teacher's second SFT stage, with slips (0: clean SFT only; default 200)")
    ap.add_argument("--teacher-slip-lr", type=float, default=None, help="peak LR of the slip stage (default 1e-3)")
    ap.add_argument("--clean-teacher", type=Path, default=None,
                    help="reuse this folder as the clean SFT stage's teacher (a previous build's; its build.json "
                         "one folder up gives its numbers) instead of training it")
    ap.add_argument("--teacher-slips", type=float, default=0.25,
                    help="per-sentence slip probability in half of the teacher's long-task examples (slipped "
                         "numbers masked from the loss): a teacher that continues soundly from a student's slips")
    ap.add_argument("--student-steps", type=int, default=600)
    ap.add_argument("--student-lr", type=float, default=3e-3)
    ap.add_argument("--student-batch", type=int, default=32)
    ap.add_argument("--student-eval-every", type=int, default=50)
    ap.add_argument("--student-stop", type=float, default=0.30,
                    help="stop the student once its long-task validation accuracy reaches this")
    ap.add_argument("--student-target", type=float, default=0.2)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--n-train-prompts", type=int, default=2000, help="prompts written to data/*train.jsonl")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is the most robust on a shared 2-core CPU)")
    ap.add_argument("--save-dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--skip-teacher", action="store_true", help="reuse the teacher (and tokenizer) already in --out")
    ap.add_argument("--skip-student", action="store_true", help="reuse the student already in --out")
    ap.add_argument("--readme-only", action="store_true", help="only rewrite README.md from --out/build.json")
    args = ap.parse_args(argv)
    global TASK
    TASK = TASKS[args.task]
    defaults = dict(out=ROOT / "fastopd" / "assets" / "demo", teacher_slip_steps=200, teacher_slip_lr=1e-3)
    if args.task == "check":
        defaults = CHECK_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.task == "check" and args.teacher_slip_evals == 1 and "--teacher-slip-evals" not in (argv or sys.argv):
        args.teacher_slip_evals = CHECK_DEFAULTS["teacher_slip_evals"]
    if args.readme_only:
        return readme_only(args.out)

    torch.set_num_threads(args.threads)
    random.seed(0)
    t_start = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    save_dtype = getattr(torch, args.save_dtype)
    timings = {}

    # held-out problems of both tasks (eval: the final numbers; val: checkpoint selection), disjoint
    def eval_and_val(make, seed_val):
        ev = make(args.n_eval, EVAL_SEED if make is make_problems else TASK.EVAL_SEED, split="eval")
        seen = {p["prompt"] for p in ev}
        val = [p for p in make(args.n_val + args.n_eval, seed_val, split="eval") if p["prompt"] not in seen]
        return ev, val[:args.n_val]

    eval_problems, val_problems = eval_and_val(TASK.make_problems, VAL_SEED)
    arith_eval, arith_val = eval_and_val(make_problems, VAL_SEED)

    # 1. tokenizer
    t0 = time.time()
    tok_dir = out / "tokenizer"
    if args.tokenizer is not None and args.part != "finish":  # reuse a tokenizer (the check task: the demo's)
        # (copied once: two parts started together must not rewrite the files the other is reading)
        if tok_dir.resolve() != args.tokenizer.resolve() and not (tok_dir / "tokenizer.json").exists():
            shutil.copytree(args.tokenizer, tok_dir, dirs_exist_ok=True)
    elif not args.skip_teacher and args.part in ("all", "teacher"):
        tok = train_tokenizer(args.vocab_size, TRAIN_SEED)
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        tok.save_pretrained(tok_dir)
        # name the class every transformers version knows (v5 maps it to its TokenizersBackend)
        cfg_path = tok_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    timings["tokenizer"] = time.time() - t0

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.padding_side = "right"
    print(f"tokenizer: vocab {len(tok)} -> {tok_dir} ({timings['tokenizer']:.1f}s)", flush=True)

    results = {"vocab": len(tok)}
    # 2. teacher: (a) SFT on clean solutions; (b) a shorter SFT from (a)'s saved weights with student-like
    # slips in half of the long-task examples (slipped numbers masked), so that it continues soundly from the
    # states a weak student's rollouts are in (docs/training.md, "Why distillation did not teach")
    if not args.skip_teacher and args.part in ("all", "teacher"):
        t0 = time.time()
        if args.init_teacher is not None:  # start from another model's weights: the slip stage only
            results["teacher_init"] = str(args.init_teacher.relative_to(ROOT) if args.init_teacher.is_absolute()
                                          and ROOT in args.init_teacher.parents else args.init_teacher)
            teacher = AutoModelForCausalLM.from_pretrained(args.init_teacher)
            save_model(teacher, tok_dir, out / "teacher", save_dtype)
            del teacher
        elif args.clean_teacher is None:
            teacher = make_model(TEACHER_CFG, tok, seed=1)
            print(f"teacher: {n_params(teacher):,} params", flush=True)
            snaps = sft(teacher, tok, steps=args.teacher_steps, batch_size=args.teacher_batch, lr=args.teacher_lr,
                        seed=TRAIN_SEED + 1, desc="teacher SFT",
                        eval_every=max(1, args.teacher_steps // args.teacher_evals),
                        val_problems=val_problems, ood_val_problems=arith_val, long_fraction=args.long_fraction,
                        snapshot_dir=out / "teacher_snapshot")
            results["teacher_val_curve"] = [(s[0], s[1], s[3]) for s in snaps]
            results["teacher_acc_fp32"] = greedy_accuracy(teacher, tok, eval_problems)
            save_model(teacher, tok_dir, out / "teacher", save_dtype)
            del teacher, snaps
        else:  # stage (a) reused from a folder (a previous build's clean teacher; its numbers from build.json)
            previous = json.loads((args.clean_teacher.parent / "build.json").read_text())["results"]
            for key in ("teacher_val_curve", "teacher_acc_fp32"):
                results[key] = previous[key]
            if args.clean_teacher.resolve() != (out / "teacher").resolve():
                shutil.copytree(args.clean_teacher, out / "teacher", dirs_exist_ok=True)
        timings["teacher"] = time.time() - t0
        if args.teacher_slip_steps > 0:
            t1 = time.time()
            teacher = AutoModelForCausalLM.from_pretrained(out / "teacher")  # the saved (rounded) weights
            snaps = sft(teacher, tok, steps=args.teacher_slip_steps, batch_size=args.teacher_batch,
                        lr=args.teacher_slip_lr, seed=TRAIN_SEED + 4, desc="teacher slip SFT", warmup=20,
                        eval_every=max(1, args.teacher_slip_steps // args.teacher_slip_evals),
                        val_problems=val_problems, ood_val_problems=arith_val,
                        long_fraction=args.long_fraction, slips=args.teacher_slips)
            results["teacher_slip_curve"] = [(s[0], s[1], s[3]) for s in snaps]
            results["teacher_acc_fp32"] = greedy_accuracy(teacher, tok, eval_problems)
            save_model(teacher, tok_dir, out / "teacher", save_dtype)
            timings["teacher_slips"] = time.time() - t1
            del teacher, snaps
        print(f"teacher: fp32 acc {results['teacher_acc_fp32']:.3f} ({time.time() - t0:.0f}s)", flush=True)

    if args.part == "teacher":
        return _save_part(out, "teacher", results, timings)

    # 3. student
    if args.part == "finish":
        for part in ("teacher", "student"):
            saved = json.loads((out / f"build_{part}.json").read_text())
            results.update(saved["results"])
            timings.update(saved["timings_s"])
    elif args.skip_student:  # keep the shipped student and the numbers of the build that made it
        previous = json.loads((out / "build.json").read_text())["results"]
        for key in ("student_val_curve", "student_step", "student_acc_fp32"):
            results[key] = previous[key]
        timings["student"] = 0.0
    elif args.part in ("all", "student"):
        t0 = time.time()
        if args.init_student is not None:
            student = AutoModelForCausalLM.from_pretrained(args.init_student)
            results["student_init"] = str(args.init_student.relative_to(ROOT) if args.init_student.is_absolute()
                                          and ROOT in args.init_student.parents else args.init_student)
        else:
            student = make_model(STUDENT_CFG, tok, seed=2)
        print(f"student: {n_params(student):,} params", flush=True)
        snaps = sft(student, tok, steps=args.student_steps, batch_size=args.student_batch, lr=args.student_lr,
                    seed=TRAIN_SEED + 2, desc="student SFT", eval_every=args.student_eval_every,
                    val_problems=val_problems, ood_val_problems=arith_val, stop_at=args.student_stop,
                    long_fraction=args.long_fraction)
        results["student_val_curve"] = [(s[0], s[1], s[3]) for s in snaps]
        # the checkpoint nearest the target long-task accuracy, preferring ones inside [5%, 40%]
        inside = [s for s in snaps if 0.05 <= s[1] <= 0.40] or snaps
        step, val_acc, state, _ = min(inside, key=lambda s: (abs(s[1] - args.student_target), s[0]))
        student.load_state_dict(state)
        results["student_step"] = step
        results["student_acc_fp32"] = greedy_accuracy(student, tok, eval_problems)
        save_model(student, tok_dir, out / "student", save_dtype)
        timings["student"] = time.time() - t0
        print(f"student: kept step {step} (val {val_acc:.3f}); fp32 acc {results['student_acc_fp32']:.3f} "
              f"({timings['student']:.0f}s)", flush=True)
    if args.part == "student":
        return _save_part(out, "student", results, timings)

    # 4. reload through the public code paths and re-measure, on both tasks
    t0 = time.time()
    for name in ("teacher", "student"):
        m = AutoModelForCausalLM.from_pretrained(out / name)
        t = AutoTokenizer.from_pretrained(out / name)
        assert next(m.parameters()).dtype == torch.float32, next(m.parameters()).dtype
        acc, comps = greedy_accuracy(m, t, eval_problems, return_completions=True)
        results[f"{name}_acc"] = acc
        results[f"{name}_arith_acc"] = greedy_accuracy(m, t, arith_eval)
        results[f"{name}_params"] = n_params(m)
        results[f"{name}_samples"] = comps[:2]
        print(f"{name} (reloaded from {args.save_dtype} safetensors as fp32): {args.task}-task acc {acc:.3f}, "
              f"arithmetic acc {results[name + '_arith_acc']:.3f} on {len(eval_problems)} held-out problems each",
              flush=True)
    timings["reload_eval"] = time.time() - t0
    timings["total"] = time.time() - t_start
    if args.part == "finish":  # the parts ran at once: the wall time is the longer part plus this one
        timings["total"] = max(timings.get("teacher", 0) + timings.get("teacher_slips", 0),
                               timings.get("student", 0)) + timings["reload_eval"] + timings["tokenizer"]

    # 5. prompt files for the OPD demo (JSONL with prompt + answer, prompts already formatted)
    data = out / "data"
    write_jsonl(data / "train.jsonl", make_problems(args.n_train_prompts, TRAIN_SEED + 3, split="train"))
    write_jsonl(data / "eval.jsonl", arith_eval)
    write_jsonl(data / f"{args.task}_train.jsonl",
                TASK.make_problems(args.n_train_prompts, TASK.TRAIN_SEED + 3, split="train"))
    write_jsonl(data / f"{args.task}_eval.jsonl", eval_problems)

    sizes = {name: dir_size(out / name) for name in ("tokenizer", "teacher", "student", "data")}
    (out / "build.json").write_text(json.dumps(
        {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
         "results": {k: v for k, v in results.items() if not k.endswith("samples") or k.startswith("student")},
         "sizes_bytes": sizes,
         "timings_s": {k: round(v, 1) for k, v in timings.items()}}, indent=1) + "\n")
    write_readme(out, args, results, timings, sizes, eval_problems)
    print(json.dumps({"results": {k: v for k, v in results.items() if not k.endswith("samples")},
                      "sizes_bytes": sizes, "total_bytes": dir_size(out),
                      "timings_s": {k: round(v, 1) for k, v in timings.items()}}, indent=1), flush=True)


def _save_part(out: Path, part: str, results: dict, timings: dict) -> None:
    """``--part teacher|student``: this part's numbers to ``build_<part>.json`` for ``--part finish``."""
    (out / f"build_{part}.json").write_text(json.dumps(
        {"results": {k: v for k, v in results.items() if k != "vocab"},
         "timings_s": {k: round(v, 1) for k, v in timings.items() if k != "tokenizer"}}, indent=1) + "\n")
    print(f"{part}: done, numbers in {out / f'build_{part}.json'}", flush=True)


def _threads(n: int) -> str:
    return f"{n} torch thread" + ("s" if n != 1 else "")


def _accuracy_rows(results: dict, fp32_column: str, reloaded_column: str) -> list:
    """The assets README's accuracy table (teacher and student; the arithmetic task reloaded)."""
    return [
        f"| model | {fp32_column} | {reloaded_column} | arithmetic task (reloaded) |",
        "|---|---|---|---|",
        f"| teacher | {results.get('teacher_acc_fp32', float('nan')):.1%} | {results['teacher_acc']:.1%} | "
        f"{results['teacher_arith_acc']:.1%} |",
        f"| student | {results['student_acc_fp32']:.1%} | {results['student_acc']:.1%} | "
        f"{results['student_arith_acc']:.1%} |",
        "",
    ]


def _student_samples(results: dict, title: str) -> list:
    """The student's sample greedy completions, as a fenced block under ``title`` (none: nothing)."""
    if not results.get("student_samples"):
        return []
    return [title, "", "```", *[s.strip() for s in results["student_samples"]], "```", ""]


def _model_line(out: Path, name: str, results: dict) -> str:
    """One model's architecture line of an assets README, read from its saved config."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(out / name)
    return (f"`Qwen3ForCausalLM`: hidden {c.hidden_size}, layers {c.num_hidden_layers}, heads "
            f"{c.num_attention_heads}, kv heads {c.num_key_value_heads}, head_dim {c.head_dim}, "
            f"intermediate {c.intermediate_size}, vocab {c.vocab_size}, tied embeddings, "
            f"{results.get(name + '_params', 0):,} parameters")


def write_readme(out: Path, args, results, timings, sizes, eval_problems):
    if getattr(args, "task", "long") == "check":
        return write_check_readme(out, args, results, timings, sizes, eval_problems)
    cfg_line = lambda name: _model_line(out, name, results)  # noqa: E731

    def curve(key):
        pts = results.get(key)
        if not pts:
            return "reused"
        return ", ".join(f"{s}: {a:.0%} / {o:.0%}" for s, a, o in pts)

    ex = eval_problems[0]
    arith_ex = make_problems(1, EVAL_SEED, split="eval")[0]
    lines = [
        "# fastopd embedded demo assets",
        "",
        "Tiny models for the CPU demo of on-policy distillation (OPD), trained on two synthetic tasks: the",
        "long-response task of `fastopd/demo/long_task.py` (the demo's default, in-domain task) and the short",
        "multi-step arithmetic task of `fastopd/demo/task.py` (`fastopd demo --task arithmetic`, and the",
        "out-of-domain task of the default demo). Built by `scripts/build_demo_assets.py` (deterministic seeds, CPU).",
        "",
        "| folder | what |",
        "|---|---|",
        f"| `tokenizer/` | byte-level BPE (`tokenizers`), vocab {results['vocab']} (asked for at most {args.vocab_size}; "
        f"training stops once every word of the task text is one token), EOS `{EOS}`, PAD `{PAD}`, "
        f"no BOS; trained on the text of both tasks. Every number 0..{MAX_VALUE} is one token. |",
        f"| `teacher/` | {cfg_line('teacher') if (out / 'teacher').exists() else '-'} |",
        f"| `student/` | {cfg_line('student')} |",
        f"| `data/` | `long_train.jsonl` / `train.jsonl`: {args.n_train_prompts} train-split prompts of the long / "
        f"arithmetic task for OPD rollouts; `long_eval.jsonl` / `eval.jsonl`: {len(eval_problems)} held-out "
        "problems of each; one JSON object per line with `prompt` (already formatted) and `answer` |",
        "| `build.json` | the numbers below, as the build printed them |",
        "",
        "Both model folders also hold a copy of the tokenizer. Weights are safetensors in "
        f"{args.save_dtype}; `config.json` has `dtype: float32`, so",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from fastopd.demo.task import demo_asset_paths",
        "paths = demo_asset_paths()",
        "teacher = AutoModelForCausalLM.from_pretrained(paths.teacher)   # fp32 on CPU",
        "tok = AutoTokenizer.from_pretrained(paths.tokenizer)",
        "```",
        "",
        "loads fp32 models (pass `dtype=torch.bfloat16` for half precision on GPU).",
        "",
        "## Tasks and prompt format",
        "",
        "Long task: add 7-12 numbers from 1..9 (total at most 99) left to right, box the sum, then re-check every "
        "addition step once in a random order with freely phrased confirmations (16-26 sentences; why the "
        "teacher's margin fades on it: the docstring of `fastopd/demo/long_task.py`):",
        "",
        "```",
        format_prompt(ex["prompt"]) + solution_completion(ex) + EOS,
        "```",
        "",
        f"Arithmetic task: start value 1..{MAX_START}, 2-5 steps of `Add k` / `Subtract k` (k in 1..{MAX_ADD}) / "
        f"`Multiply by k` (k in 2..{MAX_MUL}); every value stays in 0..{MAX_VALUE}:",
        "",
        "```",
        format_prompt(arith_ex["prompt"]) + solution_completion(arith_ex) + EOS,
        "```",
        "",
        "Both are graded by `fastopd.train.verify.boxed_match` (last `\\boxed{...}`, numbers compared by value).",
        "",
        "## How they were trained",
        "",
        f"SFT on a mix of {args.long_fraction:.0%} long-task and {1 - args.long_fraction:.0%} arithmetic problems, "
        "loss on the solution tokens + EOS only (prompt masked), right-padded batches of freshly drawn",
        "train-split problems, AdamW (betas 0.9/0.98, weight decay 0.01), 50 warmup steps then cosine decay to",
        f"10% of the peak LR, gradient clipping 1.0, fp32 on CPU with {_threads(args.threads)}.",
        "",
        f"- teacher: {args.teacher_steps} steps x batch {args.teacher_batch}, peak LR {args.teacher_lr}. "
        f"Validation curve (step: long / arithmetic greedy accuracy, 100 problems each): {curve('teacher_val_curve')}.",
        f"- teacher, second stage (from the first stage's saved weights): {args.teacher_slip_steps} steps x batch "
        f"{args.teacher_batch}, peak LR {args.teacher_slip_lr}, 20 warmup steps, the same mix, but half of the "
        f"long-task examples carry student-like slips in their derivation (each sentence with probability "
        f"{args.teacher_slips}: a wrong result, a miscopied total or term; "
        "`fastopd.demo.long_task.slipped_solution`), the slipped numbers masked out of the loss, so the teacher "
        "continues locally from a student's slips without learning to slip (docs/training.md, \"Why distillation "
        f"did not teach\"). Validation: {curve('teacher_slip_curve')}." if results.get("teacher_slip_curve") else
        "- teacher: no second (slip) stage.",
        f"- student: scheduled for {args.student_steps} steps x batch {args.student_batch}, peak LR "
        f"{args.student_lr}; validated every {args.student_eval_every} steps, stopping once its long-task accuracy "
        f"reaches {args.student_stop:.0%}; the checkpoint nearest {args.student_target:.0%} (inside 5-40%) is kept: "
        f"step {results['student_step']}. Validation curve: {curve('student_val_curve')}.",
        "",
        "## Measured accuracy",
        "",
        f"Greedy decoding, {len(eval_problems)} held-out problems of each task, after reloading the saved files as fp32:",
        "",
        *_accuracy_rows(results, "long task (fp32 before saving)", "long task (reloaded)"),
    ]
    lines += _student_samples(results, "Sample greedy completions of the student (long task):")
    lines += [
        "## Size and time",
        "",
        f"Sizes: tokenizer {sizes['tokenizer'] / 1e3:.0f} kB, teacher {sizes['teacher'] / 1e6:.2f} MB, "
        f"student {sizes['student'] / 1e6:.2f} MB (each model folder includes its tokenizer copy), "
        f"data {sizes['data'] / 1e3:.0f} kB; all together {sum(sizes.values()) / 1e6:.2f} MB.",
        "",
        f"Build time on a shared 2-core CPU ({_threads(args.threads)}; other jobs were running, so an idle machine "
        "is faster): " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + f" ({timings['total'] / 60:.1f} min).",
        "",
        "## Rebuild",
        "",
        "```",
        "python scripts/build_demo_assets.py",
        "```",
        "",
    ]
    if getattr(args, "clean_teacher", None):
        lines += ["This build reused a previous build's first-stage teacher (`--clean-teacher`; that build's "
                  "clean SFT stage is deterministic and was byte-identical in two runs): the teacher's first-stage "
                  "numbers above are that build's. The student was trained by this script's student stage with "
                  "`--skip-teacher` after the teacher was in place.", ""]
    (out / "README.md").write_text("\n".join(lines))


def write_check_readme(out: Path, args, results, timings, sizes, eval_problems):
    """README.md of a ``--task check`` build (fastopd/assets/demo_check)."""
    cfg_line = lambda name: _model_line(out, name, results)  # noqa: E731

    def curve(key):
        return ", ".join(f"{s}: {a:.0%} / {o:.0%}" for s, a, o in results.get(key) or []) or "-"

    with_check = next(p for p in eval_problems if check_task.has_check(p["prompt"]))
    without = next(p for p in eval_problems if not check_task.has_check(p["prompt"]))
    lines = [
        "# fastopd check-task demo assets",
        "",
        "Tiny models for the check task of `fastopd/demo/check_task.py` (`fastopd demo --task check`, `fastopd study "
        "--task check`): a forced derivation of 2-14 steps, then a check whose length the prompt sets independently "
        "(none for a quarter of the problems), so the place where the teacher's margin fades varies from rollout to "
        "rollout. The out-of-domain task is the arithmetic task of `fastopd/demo/task.py`. Built by "
        "`scripts/build_demo_assets.py --task check` (deterministic seeds, CPU); the shipped `fastopd/assets/demo` "
        "is not touched.",
        "",
        "| folder | what |",
        "|---|---|",
        f"| `tokenizer/` | the demo's tokenizer (`fastopd/assets/demo/tokenizer`, copied): vocab {results['vocab']}; "
        f"every number 0..{MAX_VALUE} is one token |",
        f"| `teacher/` | {cfg_line('teacher')} |",
        f"| `student/` | {cfg_line('student')} |",
        f"| `data/` | `check_train.jsonl` / `train.jsonl`: {args.n_train_prompts} train-split prompts of the check / "
        f"arithmetic task; `check_eval.jsonl` / `eval.jsonl`: {len(eval_problems)} held-out problems of each |",
        "| `build.json` | the numbers below, as the build printed them (`build_teacher.json`, `build_student.json`: "
        "the two parts, run at once) |",
        "",
        "## The task",
        "",
        "```",
        format_prompt(with_check["prompt"]) + solution_completion(with_check) + EOS,
        "",
        format_prompt(without["prompt"]) + solution_completion(without) + EOS,
        "```",
        "",
        "## How they were trained",
        "",
        f"SFT on a mix of {args.long_fraction:.0%} check-task and {1 - args.long_fraction:.0%} arithmetic problems, "
        "loss on the solution tokens + EOS only, AdamW (betas 0.9/0.98, weight decay 0.01), cosine decay to 10 % of "
        f"the peak LR, gradient clipping 1.0, fp32 on CPU with {_threads(args.threads)}. Both models start from the "
        "shipped long-task models' weights (the derivation is the long task's), because the build shares two "
        "cores with other work:",
        "",
        f"- teacher: from `{results.get('teacher_init', '?')}`, {args.teacher_slip_steps} steps x batch "
        f"{args.teacher_batch}, peak LR {args.teacher_slip_lr}, 20 warmup steps; half of the check-task examples "
        f"carry student-like slips in their derivation (each sentence with probability {args.teacher_slips}), the "
        "slipped numbers masked out of the loss, so the teacher continues soundly from a student's slips. "
        f"Validation (step: check / arithmetic greedy accuracy, {args.n_val} problems each): "
        f"{curve('teacher_slip_curve')}.",
        f"- student: from `{results.get('student_init', 'a random initialisation')}`, {args.student_steps} steps x "
        f"batch {args.student_batch}, peak LR {args.student_lr}, 50 warmup steps, validated every "
        f"{args.student_eval_every} steps; the checkpoint nearest {args.student_target:.0%} inside 5-40 % is kept "
        f"(as for the long task's student): step {results['student_step']}. Validation: {curve('student_val_curve')}.",
        "",
        "## Measured accuracy",
        "",
        f"Greedy decoding, {len(eval_problems)} held-out problems of each task, after reloading the saved files as "
        "fp32:",
        "",
        *_accuracy_rows(results, "check task (fp32 before saving, first 200)", "check task (reloaded)"),
    ]
    lines += _student_samples(results, "Sample greedy completions of the student:")
    lines += [
        "## Size and time",
        "",
        f"Sizes: teacher {sizes['teacher'] / 1e6:.2f} MB, student {sizes['student'] / 1e6:.2f} MB, data "
        f"{sizes['data'] / 1e3:.0f} kB. Build time on the shared 2-core CPU (load 4-10 from other work; the teacher "
        "and student parts ran at once): " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + f" ({timings['total'] / 60:.1f} min of wall time).",
        "",
        "## Rebuild",
        "",
        "```",
        *CHECK_BUILD_COMMANDS,
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def readme_only(out: Path, argv=None) -> None:
    """Rewrite README.md from build.json (e.g. after editing the text), without retraining."""
    build = json.loads((out / "build.json").read_text())
    args = argparse.Namespace(**build["args"])
    module = TASKS[getattr(args, "task", "long")]
    eval_problems = module.make_problems(args.n_eval, module.EVAL_SEED, split="eval")
    write_readme(out, args, build["results"], build["timings_s"], build["sizes_bytes"], eval_problems)


if __name__ == "__main__":
    main()
