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
    (tmp_path / "student" / "config.json").write_text("{}")
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


# ---- types and finiteness (issue 22)

FLOAT_FIELDS = [f.name for f in __import__("dataclasses").fields(TrainConfig) if f.type in ("float", float)]


def test_the_float_fields_are_the_ones_checked():
    assert {"lr", "max_grad_norm", "temperature", "min_gain", "adam_eps", "top_p"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_setting_must_be_finite(name, value):
    from fastopd.train.config import MAY_BE_INFINITE

    cfg = TrainConfig(student="s", teacher="t", train_data="d", **{name: value})
    if name in MAY_BE_INFINITE and value == value:  # min_gain=-inf accepts every split, as in bic_release
        cfg.validate()
        return
    with pytest.raises(ValueError) as e:
        cfg.validate()
    what = "a number (not NaN)" if name in MAY_BE_INFINITE else "a finite number"
    assert str(e.value) == f"config field `{name}` must be {what}, got {value!r}"


def test_the_cli_refuses_a_nan_grad_norm_and_an_infinite_lr_before_training(tmp_path, capsys):
    from fastopd.cli import main

    for flags in (["--max-grad-norm", "nan"], ["--lr", "inf"], ["--lr", "nan"]):
        out = tmp_path / "run"
        code = main(["train", "--student", "gpt2", "--teacher", "gpt2", "--train-data", "d", "--output-dir", str(out),
                     *flags])
        err = capsys.readouterr().err
        field = flags[0][2:].replace("-", "_")
        assert code == 2 and not out.exists() and err.count("\n") == 1, err
        assert f"`{field}` must be a finite number" in err


def _yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text("student: s\nteacher: t\ntrain_data: d\n" + text)
    return path


def test_yaml_values_are_read_as_the_type_they_mean(tmp_path):
    cfg = TrainConfig.from_yaml(_yaml(tmp_path, "lr: 5e-4\nsteps: '2'\nk: 16.0\neval_data: null\n"
                                      "chat_template: 'yes'\ntrain_split: 2024\n"))
    assert cfg.lr == 5e-4 and type(cfg.lr) is float  # YAML 1.1 reads 5e-4 as the string '5e-4'
    assert cfg.steps == 2 and type(cfg.steps) is int
    assert cfg.k == 16 and type(cfg.k) is int
    assert cfg.eval_data is None and cfg.chat_template is True and cfg.train_split == "2024"
    cfg.validate()


@pytest.mark.parametrize("line, message", [
    ("k: 16.5", "config field `k` in {} must be an integer, got 16.5"),
    ("lr: fast", "config field `lr` in {} must be a number, got 'fast'"),
    ("steps: [1, 2]", "config field `steps` in {} must be an integer, got [1, 2]"),
    ("progress: maybe", "config field `progress` in {} must be true or false, got 'maybe'"),
    ("verifier: {a: 1}", "config field `verifier` in {} must be a string, got {'a': 1}"),
    ("mode: {a: 1}", "config field `mode` in {} must be a string (or null), got {'a': 1}"),
    ("steps: true", "config field `steps` in {} must be an integer, got True"),
])
def test_a_yaml_value_of_the_wrong_type_is_one_line_naming_field_and_file(tmp_path, line, message):
    path = _yaml(tmp_path, line + "\n")
    with pytest.raises(ValueError) as e:
        TrainConfig.from_yaml(path)
    assert str(e.value) == message.replace("{}", str(path))


def test_a_yaml_syntax_error_is_one_line_naming_the_file_and_line(tmp_path):
    path = _yaml(tmp_path, "lr: [0.1\nsteps: 2\n")
    with pytest.raises(ValueError) as e:
        TrainConfig.from_yaml(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path} is not valid YAML at line ")


def test_a_wrongly_typed_value_set_in_python_is_named_by_validate():
    with pytest.raises(ValueError, match=r"^config field `lr` must be a number, got '5e-4'$"):
        TrainConfig(student="s", teacher="t", train_data="d", lr="5e-4").validate()
    with pytest.raises(ValueError, match=r"^config field `k` must be an integer, got 16.5$"):
        TrainConfig(student="s", teacher="t", train_data="d", k=16.5).validate()


def test_the_cli_reports_yaml_type_and_syntax_errors_in_one_line(tmp_path, capsys):
    from fastopd.cli import main

    for text in ("k: 16.5\n", "lr: [0.1\n"):
        path = _yaml(tmp_path, text)
        code = main(["train", "--config", str(path), "--print-config"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and str(path) in err, err


def test_run_fields_are_fields_and_exclude_logging_and_steps():
    from fastopd.train.config import RUN_FIELDS

    names = set(TrainConfig.field_names())
    assert set(RUN_FIELDS) <= names and len(set(RUN_FIELDS)) == len(RUN_FIELDS)
    for name in ("mode", "loss", "lr", "k", "min_gain", "seed", "student", "teacher", "train_data"):
        assert name in RUN_FIELDS
    for name in ("steps", "output_dir", "resume", "overwrite", "progress", "log_with", "eval_every", "save_every",
                 "keep_last", "num_threads", "log_rollouts", "eval_data"):
        assert name not in RUN_FIELDS


def test_a_model_folder_without_a_saved_model_and_too_many_threads_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^config field `teacher`: the folder '.*empty' holds no saved model"):
        check_model_path("teacher", str(tmp_path / "empty"))
    check_model_path("tokenizer", str(tmp_path / "empty"))  # a tokenizer folder has no config.json to require
    with pytest.raises(ValueError, match=r"^config field `num_threads` must be at most 2\*\*31 - 1"):
        TrainConfig(student="s", teacher="t", train_data="d", num_threads=99999999999).validate()
