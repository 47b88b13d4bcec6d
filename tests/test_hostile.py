"""Hostile inputs: values and paths a user or a file supplies are checked where they enter, and the error
names the one at fault (NaN settings, truncated ints, ids beyond int64, names escaping the image folders,
one id with two files, a BOM, an empty images list, YAML errors)."""

from __future__ import annotations

import json
import os
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



# ------------------------------------------------------------------------------ prepare: annotations

def write_coco(path, images: list[dict], captions: dict | None = None):
    """A COCO captions file: `images` as given, each id captioned (by `captions` or a default)."""
    anns = [{"image_id": img["id"], "caption": (captions or {}).get(img["id"], "a red square on grey")}
            for img in images]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def prepare_cli(*args):
    return run(["prepare", "--vocab-threshold", "1", *map(str, args)])


@pytest.fixture
def hostile(tmp_path):
    """root/a/b/images/{a.jpg, sub/} and, outside it, root/secret/outside.jpg and root/abs/abs.jpg."""
    from conftest import make_jpeg

    images = tmp_path / "a" / "b" / "images"
    make_jpeg(images / "a.jpg")
    (images / "sub").mkdir()
    outside = make_jpeg(tmp_path / "secret" / "outside.jpg")
    absolute = make_jpeg(tmp_path / "abs" / "abs.jpg")
    return {"root": tmp_path, "images": images, "outside": outside, "absolute": absolute}


def test_coco_ids_beyond_int64_are_refused_naming_the_entry(hostile, tmp_path):
    from pipeline.prepare.datasets import read_coco

    ann = write_coco(tmp_path / "captions_train2014.json", [{"id": 99999999999999999999, "file_name": "a.jpg"}])
    with pytest.raises(PipelineError, match=r'images\[0\] \("file_name": \'a.jpg\'\) has "id" 99999999999999999999, '
                                            r"which does not fit in 64 bits"):
        read_coco([ann], [hostile["images"]])
    line = one_error_line(prepare_cli("--annotations", ann, "--images", hostile["images"], "--out-dir", tmp_path / "o"))
    assert "99999999999999999999" in line and "64 bits" in line
    for bad in (2 ** 63, -(2 ** 63) - 1):
        write_coco(ann, [{"id": bad, "file_name": "a.jpg"}])
        with pytest.raises(PipelineError, match="does not fit in 64 bits"):
            read_coco([ann], [hostile["images"]])
    for good in (2 ** 63 - 1, -5):  # the edge of int64 and a negative id: stored as int64 like any other
        write_coco(ann, [{"id": good, "file_name": "a.jpg"}])
        r = prepare_cli("--annotations", ann, "--images", hostile["images"], "--out-dir", tmp_path / f"o{good}")
        assert r.exit_code == 0, r.output
        import h5py

        with h5py.File(tmp_path / f"o{good}" / "labels.h5") as f:
            assert f["image_ids"][:].tolist() == [good]


@pytest.mark.parametrize("key", ["cocoid", "imgid"])
def test_karpathy_ids_beyond_int64_or_not_integers_are_refused(key, hostile, tmp_path):
    from pipeline.prepare.datasets import read_karpathy

    ann = tmp_path / "dataset_coco.json"
    for bad, problem in ((99999999999999999999, "does not fit in 64 bits"), (2.5, "not an integer id"),
                         (True, "not an integer id")):
        ann.write_text(json.dumps({"images": [{"filename": "a.jpg", key: bad, "split": "train",
                                               "sentences": [{"raw": "a red square"}]}]}))
        with pytest.raises(PipelineError, match=rf'images\[0\] \("filename": \'a.jpg\'\) has "{key}" .*{problem}'):
            read_karpathy(ann, [hostile["images"]])


OUTSIDE_NAMES = ["../../../secret/outside.jpg", "sub/../../../../secret/outside.jpg"]


def test_coco_names_leaving_the_image_folders_are_refused_unless_allowed(hostile, tmp_path):
    names = OUTSIDE_NAMES + [str(hostile["absolute"])]
    images = [{"id": 1, "file_name": "a.jpg"}] + [{"id": 2 + i, "file_name": n} for i, n in enumerate(names)]
    ann = write_coco(tmp_path / "captions_train2014.json", images)
    out = tmp_path / "out"
    line = one_error_line(prepare_cli("--annotations", ann, "--images", hostile["images"], "--out-dir", out))
    assert "3 image names in" in line and "lead outside the image folders" in line and "--allow-outside" in line
    for n in names:
        assert repr(n) in line, line
    assert not (out / "manifest.json").exists()

    r = prepare_cli("--annotations", ann, "--images", hostile["images"], "--out-dir", out, "--allow-outside")
    assert r.exit_code == 0 and "read 3 images from outside the image folders" in r.output, r.output
    from pipeline.core.manifest import load_manifest

    m = load_manifest(out / "manifest.json")
    assert sorted(os.path.realpath(m.path_of(i)) for i in range(len(m.images))) == sorted(
        map(os.path.realpath, [hostile["images"] / "a.jpg", hostile["outside"], hostile["outside"],
                               hostile["absolute"]]))


def test_outside_names_from_params_yaml_and_python(hostile, tmp_path):
    from pipeline.prepare.datasets import read_dataset

    ann = write_coco(tmp_path / "captions_train2014.json", [{"id": 1, "file_name": OUTSIDE_NAMES[0]}])
    with pytest.raises(PipelineError, match="1 image names in .* lead outside"):
        read_dataset("coco", [ann], [hostile["images"]])
    m, stats = read_dataset("coco", [ann], [hostile["images"]], allow_outside=True)
    assert [r.file for r in m.images] == [OUTSIDE_NAMES[0]] and stats.outside_images == 1
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"prepare": {"annotations": [str(ann)], "images": [str(hostile["images"])],
                                              "vocab_threshold": 1, "allow_outside": True}}))
    r = run(["--params", str(params), "prepare", "--out-dir", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output


def test_a_symlinked_image_folder_and_symlinks_inside_it_still_work(hostile, tmp_path):
    """Only the annotation's own name is judged (normalised text): the folder may be a symlink, and a
    symlink inside it is the folder owner's choice and is followed."""
    link = tmp_path / "linked_images"
    link.symlink_to(hostile["images"], target_is_directory=True)
    (hostile["images"] / "inlink.jpg").symlink_to(hostile["outside"])
    ann = write_coco(tmp_path / "captions_train2014.json", [{"id": 1, "file_name": "a.jpg"},
                                                            {"id": 2, "file_name": "inlink.jpg"},
                                                            {"id": 3, "file_name": "sub/../a.jpg"}])
    r = prepare_cli("--annotations", ann, "--images", link, "--out-dir", tmp_path / "out")
    assert r.exit_code == 0 and "3 images" in r.output, r.output


def test_karpathy_names_leaving_the_image_folders_are_refused(hostile, tmp_path):
    from pipeline.prepare.datasets import read_karpathy

    ann = tmp_path / "dataset_coco.json"
    entries = [{"filepath": "../../../secret", "filename": "outside.jpg", "cocoid": 1},
               {"filename": str(hostile["absolute"]), "cocoid": 2},
               {"filepath": "sub", "filename": "../../../../secret/outside.jpg", "cocoid": 3},
               {"filename": "a.jpg", "cocoid": 4}]
    ann.write_text(json.dumps({"images": [{**e, "split": "train", "sentences": [{"raw": "a red square"}]}
                                          for e in entries]}))
    with pytest.raises(PipelineError, match=r"^3 image names in .* lead outside .*'\.\./\.\./\.\./secret/outside\.jpg'"):
        read_karpathy(ann, [hostile["images"]])
    m, stats = read_karpathy(ann, [hostile["images"]], allow_outside=True)
    assert len(m.images) == 4 and stats.outside_images == 3


def test_flickr8k_names_leaving_the_image_folders_are_refused(hostile, tmp_path):
    from pipeline.prepare.datasets import read_flickr8k

    text = tmp_path / "text"
    text.mkdir()
    names = ["a.jpg", OUTSIDE_NAMES[0], str(hostile["absolute"])]
    (text / "Flickr8k.token.txt").write_text("".join(f"{n}#0\ta red square\n" for n in names))
    (text / "Flickr_8k.trainImages.txt").write_text("\n".join(names) + "\n")
    with pytest.raises(PipelineError, match=r"^2 image names in .* lead outside"):
        read_flickr8k([text], [hostile["images"]])
    m, _ = read_flickr8k([text], [hostile["images"]], allow_outside=True)
    assert len(m.images) == 3


def test_one_coco_id_with_two_files_is_refused_naming_both(hostile, tmp_path):
    from conftest import make_jpeg

    make_jpeg(hostile["images"] / "b.jpg")
    ann = write_coco(tmp_path / "captions_train2014.json", [{"id": 1, "file_name": "b.jpg"},
                                                            {"id": 2, "file_name": "b.jpg"},
                                                            {"id": 1, "file_name": "a.jpg"}])
    line = one_error_line(prepare_cli("--annotations", ann, "--images", hostile["images"], "--out-dir", tmp_path / "o"))
    assert "image id 1 is listed with two files, 'b.jpg' (images[0]) and 'a.jpg' (images[2])" in line, line
    write_coco(ann, [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "a.jpg"}])  # a repeated entry: harmless
    assert prepare_cli("--annotations", ann, "--images", hostile["images"], "--out-dir", tmp_path / "o").exit_code == 0


def test_a_utf8_bom_is_accepted(hostile, tmp_path):
    from pipeline.prepare.datasets import read_coco, read_flickr8k, read_karpathy

    ann = write_coco(tmp_path / "captions_train2014.json", [{"id": 1, "file_name": "a.jpg"}])
    ann.write_bytes(b"\xef\xbb\xbf" + ann.read_bytes())
    assert [r.id for r in read_coco([ann], [hostile["images"]])[0].images] == [1]
    kp = tmp_path / "dataset_coco.json"
    kp.write_text("\ufeff" + json.dumps({"images": [{"filename": "a.jpg", "cocoid": 7, "split": "train",
                                                     "sentences": [{"raw": "a red square"}]}]}), encoding="utf-8")
    assert [r.id for r in read_karpathy(kp, [hostile["images"]])[0].images] == [7]
    text = tmp_path / "text"
    text.mkdir()
    (text / "Flickr8k.token.txt").write_text("\ufeffa.jpg#0\ta red square\n", encoding="utf-8")
    (text / "Flickr_8k.trainImages.txt").write_text("\ufeffa.jpg\n", encoding="utf-8")
    assert [r.file for r in read_flickr8k([text], [hostile["images"]])[0].images] == ["a.jpg"]


def test_an_empty_images_list_says_so(hostile, tmp_path):
    ann = tmp_path / "captions_train2014.json"
    ann.write_text('{"images": [], "annotations": []}')
    line = one_error_line(prepare_cli("--annotations", ann, "--images", hostile["images"], "--out-dir", tmp_path / "o"))
    assert f'{ann} lists no images ("images" is empty)' in line and "none of the 0" not in line, line
    kp = tmp_path / "dataset_coco.json"
    kp.write_text('{"images": []}')
    line = one_error_line(run(["prepare", "--dataset", "karpathy", "--annotations", str(kp), "--images",
                               str(hostile["images"]), "--out-dir", str(tmp_path / "o")]))
    assert f"{kp} lists no images" in line, line
