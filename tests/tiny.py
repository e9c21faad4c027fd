"""Tiny random Qwen3 teacher/student pairs and prompt files, for tests and smoke runs (no download).

    from tiny import make_tiny_run           # tests/ is on sys.path (tests/conftest.py)
    paths = make_tiny_run("/tmp/tiny")   # tokenizer + teacher + student folders, train/eval JSONL

The tokenizer is a byte-level BPE trained in a second on the synthetic arithmetic task's text; the models
are randomly initialised ``Qwen3ForCausalLM`` with a few thousand parameters, so one OPD step takes a
fraction of a second on a CPU. They generate gibberish: use them to exercise code, not to measure learning
(the shipped demo models in ``fastopd/assets/demo`` are trained). :func:`tiny_config`, :func:`load_models` and
:func:`text_rollouts` are the tests' shortcuts to a config, the loaded models and hand-made rollouts.
"""

from __future__ import annotations

from pathlib import Path

EOS, PAD = "<|endoftext|>", "<|pad|>"


def make_tokenizer(vocab_size: int = 320, extra_tokens: tuple[str, ...] = ()):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with EOS/PAD, trained on task text (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fastopd.demo.task import format_prompt, make_problems, solution_completion

    texts = [format_prompt(p["prompt"]) + solution_completion(p) for p in make_problems(300, 0, unique=False)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD, *extra_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False)


def make_model(tokenizer, *, hidden: int = 32, layers: int = 1, seed: int = 0, extra_vocab: int = 0):
    """A randomly initialised tiny ``Qwen3ForCausalLM`` over ``tokenizer`` (``extra_vocab`` padding rows)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=len(tokenizer) + extra_vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def make_tiny_run(root: str | Path, *, n_train: int = 64, n_eval: int = 8, teacher_extra_vocab: int = 0) -> dict:
    """Write ``tokenizer/``, ``teacher/``, ``student/``, ``train.jsonl``, ``eval.jsonl`` under ``root``.

    The teacher is a little wider than the student and, with ``teacher_extra_vocab``, has that many padding
    rows in its embedding (the case the trainer handles with ``vocab_size``). Returns the paths as strings.
    """
    from fastopd.demo.task import EVAL_SEED, make_problems, write_jsonl

    root = Path(root)
    tok = make_tokenizer()
    paths = {name: root / name for name in ("tokenizer", "teacher", "student")}
    tok.save_pretrained(paths["tokenizer"])
    make_model(tok, hidden=48, layers=2, seed=1, extra_vocab=teacher_extra_vocab).save_pretrained(paths["teacher"])
    make_model(tok, hidden=32, layers=1, seed=2).save_pretrained(paths["student"])
    for name in ("teacher", "student"):
        tok.save_pretrained(paths[name])
    paths["train"] = write_jsonl(root / "train.jsonl", make_problems(n_train, 0, split="train"))
    paths["eval"] = write_jsonl(root / "eval.jsonl", make_problems(n_eval, EVAL_SEED, split="eval"))
    return {k: str(v) for k, v in paths.items()}


def tiny_config(tiny, out, **kw):
    """A short TrainConfig on a :func:`make_tiny_run` folder (``kw`` overrides fields)."""
    from fastopd.train.config import TrainConfig

    base = dict(student=tiny["student"], teacher=tiny["teacher"], train_data=tiny["train"], output_dir=str(out),
                steps=2, prompts_per_step=2, num_samples=2, max_new_tokens=16, lr=1e-3, progress=False,
                log_with="none", num_threads=1, eval_at_start=False)
    base.update(kw)
    return TrainConfig(**base)


def load_models(tiny):
    """(tokenizer, student, teacher) of a :func:`make_tiny_run` folder, fp32, the teacher in eval mode."""
    import torch

    from fastopd.train.models import load_model, load_tokenizer

    tok = load_tokenizer(tiny["tokenizer"])
    student = load_model(tiny["student"], dtype=torch.float32, attn="sdpa")
    teacher = load_model(tiny["teacher"], dtype=torch.float32, attn="sdpa").eval()
    return tok, student, teacher


def text_rollouts(tok, prompts: list[str], completions: list[str]):
    """Rollouts of given completions (+ EOS), laid out like generate's output: left-padded prompt, right pad."""
    import torch

    from fastopd.train.rollouts import IGNORE_INDEX, Rollouts

    p_ids = [tok(p)["input_ids"] for p in prompts]
    c_ids = [tok(c)["input_ids"] + [tok.eos_token_id] for c in completions]
    p_w, c_w = max(map(len, p_ids)), max(map(len, c_ids))
    n = len(prompts)
    ids = torch.full((n, p_w + c_w), tok.pad_token_id)
    mask = torch.zeros((n, p_w + c_w), dtype=torch.long)
    targets = torch.full((n, c_w), IGNORE_INDEX)
    for i, (p, c) in enumerate(zip(p_ids, c_ids)):
        ids[i, p_w - len(p):p_w] = torch.tensor(p)
        ids[i, p_w:p_w + len(c)] = torch.tensor(c)
        mask[i, p_w - len(p):p_w + len(c)] = 1
        targets[i, :len(c)] = torch.tensor(c)
    lengths = torch.tensor([len(c) for c in c_ids])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Rollouts(ids, mask, pos, p_w, targets, lengths, torch.ones(n, dtype=torch.bool), list(completions))
