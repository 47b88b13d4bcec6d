"""Typed stage settings: one dataclass per stage is the single place for names, types, defaults and help.

    @dataclass
    class TrainConfig(Settings):
        SECTION: ClassVar[str] = "train"
        lr: float = setting(1e-3, "Adam's learning rate.", min=0, min_open=True)

From that one declaration come the click options (`click_options`), the params.yaml section that feeds
them (`params_defaults`), and the checks a value must pass (`Settings.check`, run by the library
functions too, so a bad value from Python fails as clearly as one from the command line).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import MISSING, field, fields
from typing import Any, ClassVar

from pipeline.core.errors import PipelineError


def setting(default: Any, help: str = "", *, choices: tuple | None = None, min: float | None = None,
            max: float | None = None, min_open: bool = False, max_open: bool = False, required: bool = False,
            flag: str | None = None) -> Any:
    """A dataclass field carrying its command-line help and its constraints.

    choices: allowed values; min/max (open or closed): numeric range; required: the command line or
    params.yaml must give it (the default is then only a placeholder); flag: for booleans, "--x/--no-x"
    (the default) or "--x" for a plain on-switch.
    """
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_open": min_open, "max_open": max_open,
            "required": required, "flag": flag}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _base_type(tp):
    """int | None -> int; list[str] -> list; plain types unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return list
    if args and origin is not None:
        return args[0]
    return tp


class Settings:
    """Mixin for the stage configs (dataclasses)."""

    SECTION: ClassVar[str] = ""

    def check(self) -> None:
        """Refuse any value outside its field's type, range or choices, naming the setting."""
        hints = _hints(type(self))
        for f in fields(self):
            value, meta, where = getattr(self, f.name), f.metadata, f"{self.SECTION}.{f.name}"
            tp = _base_type(hints[f.name])
            optional = type(None) in typing.get_args(hints[f.name])
            if value is None and optional:
                continue
            if tp is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, f.name, value)
            if tp is list and isinstance(value, tuple):
                value = list(value)
                object.__setattr__(self, f.name, value)
            if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
                raise PipelineError(f"{where} must be {tp.__name__}, got {value!r}")
            if meta.get("required") and value in ("", [], None):
                raise PipelineError(f"{where} is required: give --{f.name.replace('_', '-')} or set it in params.yaml")
            if meta.get("choices") and value not in meta["choices"]:
                raise PipelineError(f"{where} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
            lo, hi = meta.get("min"), meta.get("max")
            if lo is not None and (value < lo or (meta.get("min_open") and value == lo)):
                raise PipelineError(f"{where} must be {'>' if meta.get('min_open') else '>='} {lo}, got {value!r}")
            if hi is not None and (value > hi or (meta.get("max_open") and value == hi)):
                raise PipelineError(f"{where} must be {'<' if meta.get('max_open') else '<='} {hi}, got {value!r}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: dict, where: str = ""):
        """A checked config from a dict (params.yaml section, click options): unknown names are refused."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise PipelineError(f"{where or cls.SECTION}: unknown setting(s) {', '.join(unknown)}; "
                                f"known: {', '.join(cls.names())}")
        cfg = cls(**values)
        cfg.check()
        return cfg

    @classmethod
    def pick(cls, options: dict, prefix: str = "") -> tuple[Any, dict]:
        """Split click's keyword arguments into (this config, the other options)."""
        names = set(cls.names())
        mine = {k[len(prefix):]: v for k, v in options.items() if k.startswith(prefix) and k[len(prefix):] in names}
        rest = {k: v for k, v in options.items() if not (k.startswith(prefix) and k[len(prefix):] in names)}
        return cls.from_dict(mine), rest

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def click_options(cls: type[Settings], prefix: str = "", exclude: tuple = ()) -> Callable:
    """A decorator adding one click option per field of `cls` (names with `prefix`, e.g. "eval_")."""
    import click

    hints = _hints(cls)
    options = []
    for f in fields(cls):
        if f.name in exclude:
            continue
        meta, tp = f.metadata, hints[f.name]
        base = _base_type(tp)
        name = f"--{(prefix + f.name).replace('_', '-')}"
        default = f.default if f.default is not MISSING else f.default_factory()
        kw: dict = {"help": meta.get("help", ""), "show_default": True}
        if base is bool:
            flag = meta.get("flag") or f"{name}/--no-{name[2:]}"
            if "/" not in flag:
                kw["is_flag"] = True
            options.append(click.option(flag, prefix + f.name, default=default, **kw))
            continue
        if meta.get("choices"):
            kind = click.Choice([str(c) for c in meta["choices"]])
        elif base in (int, float) and (meta.get("min") is not None or meta.get("max") is not None):
            rng = click.IntRange if base is int else click.FloatRange
            kind = rng(meta.get("min"), meta.get("max"), min_open=meta.get("min_open", False),
                       max_open=meta.get("max_open", False))
        else:
            kind = {int: int, float: float, str: str, list: str}[base]
        if base is list:
            kw.update(multiple=True, default=tuple(default) or None)
        else:
            kw["default"] = default
        if meta.get("required"):
            kw.update(required=True, default=None, show_default=False)
        options.append(click.option(name, prefix + f.name, type=kind, **kw))

    def decorate(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return decorate


# -------------------------------------------------------------------------------------- params.yaml
def read_params(path: str) -> dict:
    """params.yaml as a dict (one clear error when it is missing or not YAML)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            params = yaml.safe_load(f) or {}
    except OSError as e:
        raise PipelineError(f"cannot read --params {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise PipelineError(f"--params {path} is not valid YAML: {e}") from None
    if not isinstance(params, dict):
        raise PipelineError(f"--params {path} must hold one mapping of sections (prepare, extract, train, ...)")
    return params


def section_defaults(params: dict, sections: dict[type[Settings], str], names: set[str], path: str) -> dict:
    """The click default_map of one command from params.yaml: each config's section, its keys checked
    against the config's fields and renamed with the command's prefix for it; keys the command has no
    option for (caption's view of the evaluate section) are left out."""
    out = {}
    for cls, prefix in sections.items():
        section = params.get(cls.SECTION) or {}
        if not isinstance(section, dict):
            raise PipelineError(f"{path}: section {cls.SECTION} must be a mapping")
        unknown = sorted(set(section) - set(cls.names()))
        if unknown:
            raise PipelineError(f"{path}: {cls.SECTION}.{unknown[0]} is not a setting of {cls.SECTION} "
                                f"(known: {', '.join(cls.names())})")
        for key, value in section.items():
            if prefix + key in names:
                out[prefix + key] = value
    return out
