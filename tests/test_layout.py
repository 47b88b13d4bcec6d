"""One source of truth: dvc.yaml's deps are the code each stage imports; params.yaml, the configs and the
CLI name the same settings with the same defaults."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import MISSING, fields

import click
import pytest
import yaml
from layout import REPO, STAGE_PACKAGES, closure, package_imports, stage_closures

from pipeline.cli import COMMANDS, SUMMARIES, main
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract.config import ExtractConfig
from pipeline.prepare.config import PrepareConfig
from pipeline.scst.config import ScstConfig
from pipeline.train.config import TrainConfig

CONFIGS = {"prepare": PrepareConfig, "extract": ExtractConfig, "train": TrainConfig, "scst": ScstConfig,
           "evaluate": EvaluateConfig}
STAGE_SECTIONS = {**{s: s for s in CONFIGS}, "evaluate_xe": "evaluate"}  # dvc stage -> its params section
DVC_ONLY_SECTIONS = {"data"}  # read by dvc.yaml's templating, by no stage


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def code_deps(stage: dict) -> list[str]:
    return [d for d in stage["deps"] if isinstance(d, str) and d.startswith("pipeline")]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGE_SECTIONS))
def test_dvc_deps_are_exactly_the_code_the_stage_imports(stage):
    closure = stage_closures()[stage]
    deps = code_deps(dvc_stages()[stage])
    missing = sorted(f for f in closure if not covered(f, deps))
    assert not missing, f"dvc.yaml's {stage} stage imports but does not list: {missing}"
    listed = {p.relative_to(REPO).as_posix() for d in deps for p in
              ([REPO / d] if (REPO / d).is_file() else (REPO / d).rglob("*.py"))}
    extra = sorted(listed - closure)
    assert not extra, f"dvc.yaml's {stage} stage lists code it never imports (touching it would rerun it): {extra}"
    assert all((REPO / d).exists() for d in deps), deps


def test_caption_uses_the_shared_encoder_not_the_extract_stage():
    """caption rebuilds the encoder from pipeline/encoder; importing it reaches no file of pipeline/extract."""
    files = {p.relative_to(REPO).as_posix() for p in closure("pipeline.caption.cli", "pipeline.caption.caption")}
    assert "pipeline/encoder/encoder.py" in files
    assert not [f for f in files if f.startswith("pipeline/extract/")], sorted(files)


def test_stage_commands_load_no_other_stage():
    """Loading `pipeline train` imports no module of extract (and so on): what the closure test reads from
    the code is also what happens at run time."""
    for stage in CONFIGS:
        others = [s for s in CONFIGS if s != stage]
        code = (f"import sys; from pipeline.cli import main; main.get_command(None, {stage!r}); "
                f"print(sorted(m for m in sys.modules if m.split('.')[1:2] and m.split('.')[1] in {others!r}))")
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]", (stage, out.stdout, out.stderr[-2000:])


def test_help_lists_every_command_without_importing_torch():
    """`pipeline --help` took 8.8 s on a busy machine because listing the commands loaded them all (and torch)."""
    code = ("import sys\nfrom pipeline.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.count('.') > 1 and "
            "m.startswith('pipeline.') and not m.startswith('pipeline.core.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]
    for name in COMMANDS:
        assert f"  {name} " in out.stdout
    for name, summary in SUMMARIES.items():  # the listing says what each command's own help says
        assert main.get_command(None, name).get_short_help_str(limit=1000) == summary, name
    assert list(SUMMARIES) == list(COMMANDS)


@pytest.mark.parametrize("stage", STAGE_PACKAGES)
def test_no_stage_package_imports_another(stage):
    """Read from every import of the package's files, function-level ones included: what two stages
    share lives in pipeline/core, pipeline/decoder or pipeline/trainer, never in one of them."""
    used = {name.split(".")[1] for name in package_imports(stage) if len(name.split(".")) > 1}
    others = sorted((used & set(STAGE_PACKAGES)) - {stage})
    assert not others, f"pipeline/{stage} imports the stage package(s) {others}"


RECIPES = ["params.yaml", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").glob("*.yaml"))]


@pytest.mark.parametrize("recipe", RECIPES)
def test_params_yaml_names_every_setting_of_every_stage(recipe):
    """params.yaml and every recipe in configs/ (which `pipeline --params` and DVC take the same way)."""
    params = yaml.safe_load((REPO / recipe).read_text())
    assert set(params) == set(CONFIGS) | DVC_ONLY_SECTIONS
    for section, cls in CONFIGS.items():
        assert list(params[section]) == cls.names(), f"params.yaml's {section} section differs from {cls.__name__}"
        cls.from_dict(params[section])  # every value passes the config's checks
    assert set(dvc_stages()) == set(STAGE_SECTIONS)
    for name, stage in dvc_stages().items():
        assert stage["params"] == [STAGE_SECTIONS[name]], f"stage {name} must depend on its own params section only"


def option_defaults(command: click.Command) -> dict:
    return {p.name: p.default for p in command.params if isinstance(p, click.Option)}


@pytest.mark.parametrize("stage", sorted(CONFIGS))
def test_cli_options_are_the_config_fields_with_the_same_defaults(stage):
    cls = CONFIGS[stage]
    options = option_defaults(main.get_command(None, stage))
    for f in fields(cls):
        assert f.name in options, f"`pipeline {stage}` has no --{f.name.replace('_', '-')}"
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.metadata.get("required"):
            continue
        assert options[f.name] == default, f"`pipeline {stage} --{f.name}` default {options[f.name]!r} != {default!r}"


def test_caption_and_bench_use_the_same_settings():
    caption = option_defaults(main.get_command(None, "caption"))
    for name in ("beam_size", "max_length", "length_penalty", "device"):
        assert caption[name] == EvaluateConfig.defaults()[name]
    blind = option_defaults(main.get_command(None, "bench").commands["blind"])
    for f in fields(TrainConfig):
        if f.name != "blind":
            assert blind[f.name] == TrainConfig.defaults()[f.name]
    for name, value in EvaluateConfig.defaults().items():
        assert blind[f"eval_{name}"] == value
    assert set(COMMANDS) >= set(CONFIGS)


def test_params_file_feeds_each_command_and_refuses_unknown_settings(tmp_path):
    from click.testing import CliRunner

    params = tmp_path / "params.yaml"
    params.write_text("train: {lrr: 0.1}\n")
    r = CliRunner().invoke(main, ["--params", str(params), "train", "--cache-dir", str(tmp_path)])
    assert r.exit_code != 0 and "train.lrr is not a setting of train" in r.output and "Traceback" not in r.output
    params.write_text("train: {epochs: 0}\n")
    r = CliRunner().invoke(main, ["--params", str(params), "train", "--cache-dir", str(tmp_path)])
    assert r.exit_code != 0 and "epochs" in r.output and "Traceback" not in r.output


def test_bad_settings_from_python_are_refused_like_on_the_command_line():
    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match=r"train.lr must be > 0"):
        TrainConfig(lr=0).check()
    with pytest.raises(PipelineError, match=r"extract.arch must be one of"):
        ExtractConfig(arch="vgg16").check()
    with pytest.raises(PipelineError, match=r"evaluate.beam_size must be int"):
        EvaluateConfig(beam_size="3").check()
    with pytest.raises(PipelineError, match="unknown setting"):
        TrainConfig.from_dict({"learning_rate": 1})


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_the_projects_params_yaml(command):
    """`pipeline --params params.yaml CMD` reads CMD's sections without refusing any key of them (found:
    caption refused evaluate's split/tokenizer keys, and make demo lost its page)."""
    from click.testing import CliRunner

    r = CliRunner().invoke(main, ["--params", str(REPO / "params.yaml"), command, "--help"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output


def test_path_defaults_are_the_dvc_layout():
    """The commands' default paths (pipeline/core/paths.py) are where dvc.yaml's stages read and write, so a
    command run by hand after `dvc repro` (caption, evaluate, scst --resume) finds what DVC made."""
    from pipeline.core import paths

    cmds = {name: stage["cmd"] for name, stage in dvc_stages().items()}
    assert f"--out-dir {paths.CACHE_DIR}" in cmds["prepare"]
    assert f"--out {paths.XE_DIR} --metrics-dir {paths.XE_METRICS}" in cmds["train"]
    assert f"--init {paths.XE_CHECKPOINT} --out {paths.SCST_DIR} --metrics-dir {paths.SCST_METRICS}" in cmds["scst"]
    assert f"--checkpoint {paths.FINAL_CHECKPOINT}" in cmds["evaluate"] and f"--out {paths.EVAL_METRICS}" in cmds["evaluate"]
    defaults = {(c, p.name): p.default for c in ("train", "scst", "evaluate", "caption")
                for p in main.get_command(None, c).params}
    assert defaults[("train", "out")] == paths.XE_DIR and defaults[("scst", "init")] == paths.XE_CHECKPOINT
    assert defaults[("evaluate", "checkpoint")] == defaults[("caption", "checkpoint")] == paths.FINAL_CHECKPOINT
    assert not [c for c in cmds.values() if "--quiet" in c]  # `dvc repro` shows each stage's progress bar
