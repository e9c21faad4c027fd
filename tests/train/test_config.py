"""Tests of the trainer's configuration (fastopd/train/config.py): every bad value names its field.

The CLI flags and the docs of the fields are tested in tests/test_cli.py.
"""

from __future__ import annotations

import pytest

from fastopd.train.config import TrainConfig, check_model_path


def test_config_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="`student` is required"):
        TrainConfig(teacher="t", train_data="d").validate()
    with pytest.raises(ValueError, match="`mode` must be one of"):
        TrainConfig(student="s", teacher="t", train_data="d", mode="prefix").validate()
    with pytest.raises(ValueError, match="`num_samples` must be >= 1"):
        TrainConfig(student="s", teacher="t", train_data="d", num_samples=0).validate()
    y = tmp_path / "c.yaml"
    y.write_text("student: s\nteacher: t\ntrain_data: d\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown field `learning_rate`.*did you mean `lr`"):
        TrainConfig.from_yaml(y)


@pytest.mark.parametrize("field", ["student", "teacher", "tokenizer", "teacher_tokenizer"])
@pytest.mark.parametrize("path", ["runs/a/studnet", "./student", "/no/such/folder", "models\\student", "a--b"])
def test_a_model_path_that_is_neither_a_folder_nor_a_hub_id_is_one_line(field, path):
    cfg = TrainConfig(**{"student": "s", "teacher": "t", "train_data": "d", "output_dir": "o", field: path})
    with pytest.raises(ValueError) as e:
        cfg.validate()
    msg = str(e.value)
    assert "\n" not in msg and f"`{field}`" in msg and repr(path) in msg and "Hub id" in msg


def test_folders_and_hub_ids_pass_and_a_file_is_refused(tmp_path):
    (tmp_path / "student").mkdir()
    for ok in (str(tmp_path / "student"), "gpt2", "Qwen/Qwen3-0.6B", "org/name.v2_x-y", None, ""):
        check_model_path("student", ok)
    (tmp_path / "model.safetensors").write_text("x")
    with pytest.raises(ValueError, match=r"config field `teacher`: .*model\.safetensors' is a file"):
        check_model_path("teacher", str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="`student` must be a folder or a Hub id"):
        check_model_path("student", 3)


def test_a_bad_model_path_stops_training_before_the_output_folder_exists(tmp_path):
    from fastopd.train.trainer import train

    out = tmp_path / "run"
    cfg = TrainConfig(student=str(tmp_path / "runs" / "studnet"), teacher="t", train_data="d", output_dir=str(out))
    with pytest.raises(ValueError, match="`student`"):
        train(cfg)
    assert not out.exists()


def test_the_cli_prints_one_line_and_makes_no_folder(tmp_path, capsys):
    from fastopd.cli import main

    out = tmp_path / "run"
    code = main(["train", "--student", "fastopd/assets/demo/studnet", "--teacher", "t", "--train-data", "d",
                 "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and err.startswith("fastopd train: error: config field `student`: "
                                                   "'fastopd/assets/demo/studnet' is neither")
