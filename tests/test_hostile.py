"""Hostile inputs: values and paths a user or a file supplies are checked where they enter, and the error
names the one at fault (NaN settings, truncated ints, ids beyond int64, names escaping the image folders,
one id with two files, a BOM, an empty images list, YAML errors)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.core.errors import PipelineError
from pipeline.core.settings import Settings, click_options, section_defaults, setting
from pipeline.evaluate.config import EvaluateConfig
from pipeline.scst.config import ScstConfig
from pipeline.train.config import TrainConfig

NAN, INF = float("nan"), float("inf")


def run(args: list[str]):
    return CliRunner().invoke(main, args)


def one_error_line(r) -> str:
    """The `Error: ...` line of a refused command (and that there is exactly one, and no traceback)."""
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    return errors[0]


# ------------------------------------------------------------------------------------ 1. NaN and inf

@pytest.mark.parametrize("cfg, name", [
    (lambda v: TrainConfig(lr=v), "train.lr"),
    (lambda v: TrainConfig(dropout=v), "train.dropout"),
    (lambda v: TrainConfig(clip=v), "train.clip"),
    (lambda v: TrainConfig(weight_decay=v), "train.weight_decay"),
    (lambda v: TrainConfig(dist_timeout=v), "train.dist_timeout"),
    (lambda v: ScstConfig(lr=v), "scst.lr"),
    (lambda v: EvaluateConfig(length_penalty=v), "evaluate.length_penalty"),
])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_python_configs_refuse_nan_and_inf(cfg, name, value):
    with pytest.raises(PipelineError, match=rf"^{name} must be a (finite )?number, got -?(nan|inf)$"):
        cfg(value).check()


def test_a_setting_may_opt_in_to_inf_but_never_to_nan():
    @dataclass
    class Cfg(Settings):
        SECTION: ClassVar[str] = "t"
        limit: float = setting(INF, "No limit by default.", min=0, allow_inf=True)

    Cfg(limit=INF).check()
    with pytest.raises(PipelineError, match=r"t.limit must be a number, got nan"):
        Cfg(limit=NAN).check()
    with pytest.raises(PipelineError, match=r"t.limit must be >= 0, got -inf"):
        Cfg(limit=-INF).check()


@pytest.mark.parametrize("args, flag", [
    (["evaluate", "--length-penalty", "nan"], "--length-penalty"),
    (["caption", "--length-penalty", "nan", "x.jpg"], "--length-penalty"),
    (["evaluate", "--length-penalty", "inf"], "--length-penalty"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--lr", "NaN"], "--lr"),
    (["train", "--dropout", "nan"], "--dropout"),
    (["train", "--clip", "-inf"], "--clip"),
    (["scst", "--lr", "nan"], "--lr"),
])
def test_cli_flags_refuse_nan_and_inf(args, flag, tmp_path):
    extra = [] if args[0] == "caption" else ["--cache-dir", str(tmp_path)]
    line = one_error_line(run(args + extra))
    assert f"'{flag}'" in line and ("nan" in line or "inf" in line), line


@pytest.mark.parametrize("yaml_text, name", [
    ("train: {lr: .nan}\n", "train.lr"),
    ("train: {lr: nan}\n", "train.lr"),  # YAML reads this as the text "nan"
    ("train: {dropout: .nan}\n", "train.dropout"),
    ("train: {lr: .inf}\n", "train.lr"),
    ("scst: {lr: .nan}\n", "scst.lr"),
    ("evaluate: {length_penalty: .nan}\n", "evaluate.length_penalty"),
])
def test_params_yaml_refuses_nan_and_inf_naming_the_file_and_setting(yaml_text, name, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml_text)
    command = name.split(".")[0]
    line = one_error_line(run(["--params", str(params), command, "--cache-dir", str(tmp_path)]))
    assert f"{params}: {name} must be a" in line, line


def test_caption_reads_the_evaluate_section_checked_too(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("evaluate: {length_penalty: .nan}\n")
    line = one_error_line(run(["--params", str(params), "caption", "x.jpg"]))
    assert "evaluate.length_penalty must be a number, got nan" in line


# ------------------------------------------------------------------------------ 2. ints not truncated

@pytest.mark.parametrize("value", [2.5, "2.5", True, False, "two", INF, NAN])
def test_params_yaml_int_setting_refuses_non_integers(value, tmp_path):
    with pytest.raises(PipelineError, match=r"p.yaml: train.epochs must be"):
        section_defaults({"train": {"epochs": value}}, {TrainConfig: ""}, {"epochs"}, "p.yaml")


def test_integral_values_are_taken_as_ints_everywhere(tmp_path):
    assert section_defaults({"train": {"epochs": 3.0, "lr": 1}}, {TrainConfig: ""}, {"epochs", "lr"},
                            "p.yaml") == {"epochs": 3, "lr": 1.0}
    assert section_defaults({"train": {"epochs": "3", "lr": "1e-3"}}, {TrainConfig: ""}, {"epochs", "lr"},
                            "p.yaml") == {"epochs": 3, "lr": 0.001}
    cfg = TrainConfig(epochs=3.0)
    cfg.check()
    assert cfg.epochs == 3 and type(cfg.epochs) is int


@pytest.mark.parametrize("value", [2.5, True, False, INF])
def test_python_int_setting_refuses_non_integers(value):
    with pytest.raises(PipelineError, match=r"^train.epochs must be"):
        TrainConfig(epochs=value).check()
    with pytest.raises(PipelineError, match=r"^evaluate.beam_size must be"):
        EvaluateConfig(beam_size=value).check()


def test_params_yaml_epochs_2_5_is_refused_not_truncated(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train: {epochs: 2.5}\n")
    line = one_error_line(run(["--params", str(params), "train", "--cache-dir", str(tmp_path)]))
    assert f"{params}: train.epochs must be a whole number (int), got 2.5" in line, line


@pytest.mark.parametrize("value", ["2.5", "true", "1e400"])
def test_cli_int_flag_refuses_non_integers(value, tmp_path):
    line = one_error_line(run(["train", "--epochs", value, "--cache-dir", str(tmp_path)]))
    assert "'--epochs'" in line, line


def test_click_types_keep_the_range_in_the_help_and_take_good_values():
    import click

    @click.command()
    @click_options(TrainConfig)
    def cmd(**options):
        cfg, _ = TrainConfig.pick(options)
        click.echo(f"{cfg.epochs!r} {cfg.lr!r} {cfg.dropout!r}")

    r = CliRunner().invoke(cmd, ["--epochs", "3.0", "--lr", "1e-3", "--dropout", "0.5"])
    assert r.exit_code == 0 and r.output.strip() == "3 0.001 0.5", r.output
    r = CliRunner().invoke(cmd, ["--epochs", "0"])
    assert r.exit_code == 2 and "must be >= 1, got 0" in r.output
    help_text = CliRunner().invoke(cmd, ["--help"]).output
    assert "x>=1" in help_text and "0<x<=1" in help_text  # epochs, lr_decay


# ------------------------------------------------------------------------------------- 5d. YAML error

def test_invalid_params_yaml_is_one_line_with_line_and_column(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 0.1\n  epochs: [1, 2\n")
    r = run(["--params", str(params), "train"])
    line = one_error_line(r)
    assert line.startswith(f"Error: --params {params} is not valid YAML: ") and "line 4" in line, line
    assert len(r.output.strip().splitlines()) == 1, r.output
    params.write_text("train:\n  lr: 0.1\n epochs: 3\n")
    line = one_error_line(run(["--params", str(params), "train"]))
    assert "line 3, column 2" in line, line

