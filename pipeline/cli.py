"""The `pipeline` command: a thin click layer over the library function of each stage.

Each stage's command lives in its own package (`pipeline/<stage>/cli.py`) and is imported only when
it runs, so `pipeline train` loads nothing of extract, and dvc.yaml can name exactly the code each
stage runs. A `PipelineError` becomes one `Error: ...` line and exit status 1.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from pipeline.core.errors import PipelineError

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

# name -> "module:attribute", loaded on first use
COMMANDS = {
    "prepare": "pipeline.prepare.cli:prepare",
    "extract": "pipeline.extract.cli:extract",
    "train": "pipeline.train.cli:train",
    "scst": "pipeline.scst.cli:scst",
    "evaluate": "pipeline.evaluate.cli:evaluate",
    "caption": "pipeline.caption.cli:caption",
    "download": "pipeline.acquire.cli:download",
    "demo-data": "pipeline.acquire.cli:demo_data",
    "bench": "pipeline.bench.cli:bench",
}
# What `pipeline --help` lists for each, so that listing loads no command (they import torch: seconds);
# a test keeps each the first sentence of its command's own help.
SUMMARIES = {
    "prepare": "Read a dataset into manifest.json, vocab.json and labels.h5 under --out-dir.",
    "extract": "Run the frozen ResNet once over every image and store pooled features in HDF5.",
    "train": "Train the projection + LSTM decoder from the feature cache (the CNN is never run).",
    "scst": "Self-critical sequence training: optimise CIDEr-D directly, starting from a cross-entropy checkpoint.",
    "evaluate": "Decode a split from the cached features and score it (BLEU-1..4, METEOR, ROUGE-L, CIDEr).",
    "caption": "Caption image files: IMAGE, DIR or GLOB...",
    "download": "Download public datasets.",
    "demo-data": "Generate the offline demo dataset (COCO captions format) into DEST, deterministically.",
    "bench": "Benchmarks (extract, train, scst: speed) and ablations/quality runs (blind, quality): each prints its "
             "figures and fails (exit status 1) when a target is missed.",
}


# What to run after Ctrl-C: train and scst continue only when asked (a fresh run would start at epoch 1).
_RESUME = "rerun the same command with --resume to continue from the last finished epoch"
CONTINUE = {"train": _RESUME, "scst": _RESUME,
            "extract": "rerun the same command to continue (finished chunks are kept)",
            None: "rerun the same command to start again"}


class Group(click.Group):
    """Loads commands lazily and turns user-fixable errors into one clear line instead of a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(map(len, COMMANDS))  # as click.Group does it
        with formatter.section("Commands"):
            formatter.write_dl([(name, click.utils.make_default_short_help(SUMMARIES[name], limit)) for name in COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            from pipeline.core import distributed

            if isinstance(e, distributed.SharedError) and not distributed.context().is_main:
                sys.exit(1)  # under torchrun, rank 0 prints the shared message once
            raise click.ClickException(str(e)) from None
        except OSError as e:
            from pipeline.core.storage import DISK_ERRORS, disk_error

            if e.errno not in DISK_ERRORS:
                raise
            # the last resort for a write no stage foresaw: still one line, not a traceback
            raise click.ClickException(str(disk_error(e, e.filename or "a file", "free space or fix the "
                                                      "permissions, or choose another output place"))) from None
        except KeyboardInterrupt:
            click.echo(f"\ninterrupted: finished work is kept; {CONTINUE.get(ctx.invoked_subcommand, CONTINUE[None])}",
                       err=True)
            sys.exit(130)


def default_map(command: click.Command, params: dict, path: str) -> dict:
    """params.yaml -> the click default_map of `command` (and of a group's subcommands), from the config
    sections the command declares in its `params_sections` attribute."""
    from pipeline.core.settings import section_defaults

    if isinstance(command, click.Group):
        return {name: default_map(sub, params, path) for name, sub in command.commands.items()}
    sections = getattr(command, "params_sections", None)
    if not sections:
        return {}
    return section_defaults(params, sections, {p.name for p in command.params}, path)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pipeline")
@click.option("--params", "params_file", default=None, type=click.Path(dir_okay=False),
              help="Take option defaults from this params.yaml (one section per stage: prepare, extract, train, "
                   "evaluate); options given on the command line still win.")
@click.pass_context
def main(ctx: click.Context, params_file: str | None) -> None:
    """Show-and-Tell image captioning: cache frozen-ResNet features once, retrain decoders in minutes.

    Stages: prepare -> extract -> train -> scst -> evaluate, plus caption for new images.
    `dvc repro` runs them all from params.yaml (see dvc.yaml).
    """
    if params_file and ctx.invoked_subcommand:
        from pipeline.core.settings import read_params

        command = ctx.command.get_command(ctx, ctx.invoked_subcommand)
        ctx.default_map = {ctx.invoked_subcommand: default_map(command, read_params(params_file), params_file)}


if __name__ == "__main__":
    main()
