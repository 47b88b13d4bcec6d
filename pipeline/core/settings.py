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
import math
import typing
from collections.abc import Callable
from dataclasses import MISSING, field, fields
from typing import Any, ClassVar

from pipeline.core.errors import PipelineError


def setting(default: Any, help: str = "", *, choices: tuple | None = None, min: float | None = None,
            max: float | None = None, min_open: bool = False, max_open: bool = False, required: bool = False,
            flag: str | None = None, allow_inf: bool = False) -> Any:
    """A dataclass field carrying its command-line help and its constraints.

    choices: allowed values; min/max (open or closed): numeric range; required: the command line or
    params.yaml must give it (the default is then only a placeholder); flag: for booleans, "--x/--no-x"
    (the default) or "--x" for a plain on-switch; allow_inf: a float setting that may be +-inf (within
    min/max). NaN is refused for every float setting, and +-inf unless allow_inf.
    """
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_open": min_open, "max_open": max_open,
            "required": required, "flag": flag, "allow_inf": allow_inf}
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


class BadValue(PipelineError):
    """A value a setting refuses; the message reads after the setting's name ("must be > 0, got nan")."""


def _problem(value: Any, tp, meta) -> tuple[Any, str | None]:
    """(the value as the setting's type, None) or (value, what is wrong with it). The one place the
    rules live: Settings.check, params.yaml sections and the click options all ask it.

    int settings take Python ints and integral floats (3.0 -> 3), never bools or 2.5; float settings take
    ints and floats, never bools, never NaN, and +-inf only when the setting says allow_inf."""
    base = _base_type(tp)
    if value is None and type(None) in typing.get_args(tp):
        return None, None
    if isinstance(value, bool) and base is str and str(value).lower() in (meta.get("choices") or ()):
        value = str(value).lower()  # params.yaml's `compile: true` is YAML's bool: the choice "true"
    if isinstance(value, bool) and base is not bool:
        return value, f"must be {base.__name__}, got {value!r}"
    if base is int and isinstance(value, float):
        if not value.is_integer():
            return value, f"must be a whole number (int), got {value!r}"
        value = int(value)
    if base is float and isinstance(value, int):
        try:
            value = float(value)
        except OverflowError:
            return value, f"must be a finite number, got {value!r}"
    if base is list and isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, base):
        return value, f"must be {base.__name__}, got {value!r}"
    if base is float and math.isnan(value):
        return value, "must be a number, got nan"
    if base is float and math.isinf(value) and not meta.get("allow_inf"):
        return value, f"must be a finite number, got {value!r}"
    if meta.get("choices") and value not in meta["choices"]:
        return value, f"must be one of {', '.join(map(str, meta['choices']))}, got {value!r}"
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_open") and value == lo)):
        return value, f"must be {'>' if meta.get('min_open') else '>='} {lo}, got {value!r}"
    if hi is not None and (value > hi or (meta.get("max_open") and value == hi)):
        return value, f"must be {'<' if meta.get('max_open') else '<='} {hi}, got {value!r}"
    return value, None


def parse_number(text: str, tp) -> Any:
    """A number setting's value from text (a command-line flag, a quoted params.yaml value): "3" -> 3,
    "2.5" -> 2.5 (refused later for an int), "1e-3" -> 0.001, "nan" -> nan (refused later); text that is
    no number is returned as it is, for _problem to refuse."""
    base = _base_type(tp)
    if base not in (int, float) or not isinstance(text, str):
        return text
    try:
        return int(text.strip()) if base is int else float(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def checked_value(value: Any, tp, meta, where: str) -> Any:
    """`value` as the setting's type, or BadValue "`where` must be ...": the setting's whole rule."""
    value, problem = _problem(value, tp, meta)
    if problem:
        raise BadValue(f"{where} {problem}")
    return value


class Settings:
    """Mixin for the stage configs (dataclasses)."""

    SECTION: ClassVar[str] = ""

    def check(self) -> None:
        """Refuse any value outside its field's type, range or choices, naming the setting."""
        hints = _hints(type(self))
        for f in fields(self):
            where = f"{self.SECTION}.{f.name}"
            value = checked_value(getattr(self, f.name), hints[f.name], f.metadata, where)
            if value is not getattr(self, f.name):
                object.__setattr__(self, f.name, value)
            if f.metadata.get("required") and value in ("", [], None):
                raise PipelineError(f"{where} is required: give --{f.name.replace('_', '-')} or set it in params.yaml")

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


def _number_type(tp, meta):
    """The click type of an int/float setting: click's own INT/FLOAT (or range, for the help text's
    "x>=1"), converting with the setting's rule instead of click's: click would truncate 2.5 to 2
    (int(2.5)), take True as 1 and let NaN through every range."""
    import click

    base = _base_type(tp)
    ranged = meta.get("min") is not None or meta.get("max") is not None
    if ranged:
        parent = click.IntRange if base is int else click.FloatRange
    else:
        parent = click.types.IntParamType if base is int else click.types.FloatParamType

    class Checked(parent):
        def convert(self, value, param, ctx):
            value, problem = _problem(parse_number(value, tp), tp, meta)
            if problem:
                self.fail(problem, param, ctx)
            return value

    if not ranged:
        return Checked()
    return Checked(meta.get("min"), meta.get("max"), min_open=meta.get("min_open", False),
                   max_open=meta.get("max_open", False))


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
        elif base in (int, float):
            kind = _number_type(tp, meta)
        else:
            kind = {str: str, list: str}[base]
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
        raise PipelineError(f"--params {path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(params, dict):
        raise PipelineError(f"--params {path} must hold one mapping of sections (prepare, extract, train, ...)")
    return params


def _yaml_problem(e) -> str:
    """PyYAML's four-line report ("while scanning ... in <file>, line 1 ... found ...") as one line:
    the problem and where (line and column, 1-based), e.g. "mapping values are not allowed here (line 3,
    column 8)"."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if problem and mark is not None:
        context = f"{e.context}, " if getattr(e, "context", None) else ""
        return f"{context}{problem} (line {mark.line + 1}, column {mark.column + 1}): fix that line"
    return " ".join(str(e).split())


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
        hints, metas = _hints(cls), {f.name: f.metadata for f in fields(cls)}
        for key, value in section.items():
            tp, meta = hints[key], metas[key]
            if _base_type(tp) in (int, float):  # checked here, where the file's value enters, naming the file
                value = checked_value(parse_number(value, tp), tp, meta, f"{path}: {cls.SECTION}.{key}")
            if prefix + key in names:
                out[prefix + key] = value
    return out
