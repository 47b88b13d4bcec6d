"""Which modules of the `pipeline` package each command imports, read from the code (not run).

Every `import pipeline.x` / `from pipeline.x import y` statement counts, at module level or inside a
function (a function-level import runs when the stage runs), as do the parent packages' __init__.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"


def module_file(name: str) -> Path | None:
    """pipeline.a.b -> pipeline/a/b.py or pipeline/a/b/__init__.py (None when it is not a module)."""
    rel = Path(*name.split("."))
    for candidate in (REPO / rel.with_suffix(".py"), REPO / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path) -> set[str]:
    """Names of the pipeline modules that `path` imports (for `from pkg import name`, pkg.name when that
    is a module, else pkg)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "pipeline":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return found


def closure(*entries: str) -> set[Path]:
    """The files of every pipeline module that importing `entries` can run, parents' __init__ included."""
    todo, seen = list(entries), set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        path = module_file(name)
        if path is None:
            continue
        files.add(path)
        todo += sorted(imports_of(path))
    return files


# The DVC stages and the modules their commands start from (pipeline/cli.py loads the stage's command).
STAGE_ENTRIES = {
    "prepare": ("pipeline.cli", "pipeline.prepare.cli"),
    "extract": ("pipeline.cli", "pipeline.extract.cli"),
    "train": ("pipeline.cli", "pipeline.train.cli"),
    "scst": ("pipeline.cli", "pipeline.scst.cli"),
    "evaluate": ("pipeline.cli", "pipeline.evaluate.cli"),
    "evaluate_xe": ("pipeline.cli", "pipeline.evaluate.cli"),
}


# The stage packages (pipeline/<name>/): each is one command's own code, and none may import another's, so
# that an edit to one stage never reruns another (what stages share lives in pipeline/core, pipeline/decoder
# and pipeline/trainer). pipeline/bench is a tool, not a stage: it may import the stages it measures.
STAGE_PACKAGES = ("prepare", "extract", "train", "scst", "evaluate", "caption", "acquire")


def package_imports(package: str) -> set[str]:
    """The pipeline modules that the files of pipeline/<package>/ import."""
    return {name for path in (PACKAGE / package).rglob("*.py") for name in imports_of(path)}


def stage_closures() -> dict[str, set[str]]:
    """Stage -> the repo-relative paths (posix) of every module its command can import."""
    return {stage: {p.relative_to(REPO).as_posix() for p in closure(*entries)}
            for stage, entries in STAGE_ENTRIES.items()}


if __name__ == "__main__":
    for stage, files in stage_closures().items():
        print(stage, len(files))
        for f in sorted(files):
            print("   ", f)
