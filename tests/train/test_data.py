"""Tests of the prompt data (fastopd/train/data.py): loading JSONL and datasets folders, the prompt schedule."""

from __future__ import annotations

import pytest

from fastopd.train.data import PromptSchedule, load_prompts


def test_prompt_schedule_is_a_function_of_the_step():
    a = PromptSchedule(10, seed=1, batch=3, accum=2, world=2, rank=0)
    b = PromptSchedule(10, seed=1, batch=3, accum=2, world=2, rank=1)
    seen = []
    for step in (1, 2):
        for micro in (0, 1):
            seen += a.indices(step, micro) + b.indices(step, micro)
    # 24 draws = 2 full epochs + 4: every row twice in the first 20 draws, each epoch a permutation
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert PromptSchedule(10, seed=1, batch=3, accum=2, world=2, rank=1).indices(2, 1) == b.indices(2, 1)
    assert PromptSchedule(10, seed=2, batch=3).indices(1) != PromptSchedule(10, seed=1, batch=3).indices(1)


def test_load_prompts_jsonl_and_datasets(tmp_path):
    import datasets

    p = tmp_path / "x.jsonl"
    p.write_text('{"question": "1+1?", "gold": 2}\n\n{"question": "2+2?"}\n')
    rows = load_prompts(str(p), prompt_field="question", answer_field="gold")
    assert rows == [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": None}]
    with pytest.raises(ValueError, match="no `prompt` field"):
        load_prompts(str(p))
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a", "b"], "answer": ["1", "2"]})})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(str(tmp_path / "ds"))[1] == {"prompt": "b", "answer": "2"}
    with pytest.raises(ValueError, match="not `test`"):
        load_prompts(str(tmp_path / "ds"), split="test")
    with pytest.raises(FileNotFoundError):
        load_prompts(str(tmp_path / "missing.jsonl"))
