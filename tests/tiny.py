"""Tiny random Qwen3 teacher/student pairs and prompt files, for tests and smoke runs (no download).

    from tiny import make_tiny_run           # tests/ is on sys.path (tests/conftest.py)
    paths = make_tiny_run("/tmp/tiny")   # tokenizer + teacher + student folders, train/eval JSONL

The tokenizer is a byte-level BPE trained in a second on the synthetic arithmetic task's text; the models
are randomly initialised ``Qwen3ForCausalLM`` with a few thousand parameters, so one OPD step takes a
fraction of a second on a CPU. They generate gibberish: use them to exercise code, not to measure learning
(the shipped demo models in ``fastopd/assets/demo`` are trained).
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
