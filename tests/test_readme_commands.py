"""Every command the README shows runs as written on a fresh clone after `make demo`: the venv's programs
(`pipeline`, `dvc`, `python`, `torchrun`, ...) are reached through `.venv/bin/`, or after a
`source .venv/bin/activate` line earlier in the same section (or in the README's opening block, which then
holds for the whole page). DVC's stages call `pipeline` through PATH, so `.venv/bin/dvc repro` / `exp run`
also needs the venv's bin on PATH. `make TARGET` names a Makefile target, `pipeline CMD` a command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from pipeline.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
ACTIVATE = ("source", ".venv/bin/activate")
# programs a fresh machine has without the venv
SYSTEM = {"make", "cp", "cd", "git", "ls", "mkdir", "cat", "export", "time", "echo"}
OPERATORS = {"&&", "||", ";", "|", "&"}


def bash_blocks(text: str) -> list[tuple[int, str, list[tuple[int, str]]]]:
    """(section index, section heading, [(line number, command line)]) for every ```bash block; section 0 is
    the part before the first `##` heading (the opening block). Continued lines (trailing backslash) are joined."""
    blocks, section, heading, fence, lines = [], 0, "", None, []
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None:
            if line.startswith("```"):
                fence, lines = line[3:].strip(), []
            elif re.match(r"#{2,6} ", line):
                section, heading = section + 1, line.lstrip("#").strip()
        elif line.startswith("```"):
            if fence == "bash":
                blocks.append((section, heading, lines))
            fence = None
        elif lines and lines[-1][1].endswith("\\"):
            lines[-1] = (lines[-1][0], lines[-1][1][:-1] + " " + line.strip())
        else:
            lines.append((number, line))
    return blocks


def simple_commands(line: str) -> list[list[str]]:
    """The line's commands (split at &&, ||, ;, |), comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in OPERATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {t for m in re.finditer(r"^([A-Za-z][\w.-]*(?: [A-Za-z][\w.-]*)*):(?!=)", text, re.M) for t in m.group(1).split()}


def problems(text: str) -> list[str]:
    """What would fail when a README line is pasted into a fresh shell of a clone after `make demo`."""
    found, targets, everywhere = [], makefile_targets(), False
    active_section = None
    for section, heading, lines in bash_blocks(text):
        for number, line in lines:
            for words in simple_commands(line):
                where = f"README.md:{number} ({heading or 'top'}): {' '.join(words)}"
                venv_path = False
                while words and re.match(r"^[A-Za-z_]\w*=", words[0]):  # VAR=value before the program
                    venv_path |= words[0].startswith("PATH=") and ".venv/bin" in words[0]
                    words = words[1:]
                if not words:
                    continue
                program, args = words[0], words[1:]
                activated = everywhere or active_section == section
                if tuple(words[:2]) == ACTIVATE:
                    everywhere |= section == 0
                    active_section = section
                elif program.startswith(".venv/bin/"):
                    runs_stages = program.endswith("/dvc") and (args[:1] == ["repro"] or args[:2] == ["exp", "run"])
                    if runs_stages and not (venv_path or activated):
                        found.append(f"{where}: DVC's stages run `pipeline` through PATH: activate the venv or "
                                     "prefix PATH=$PWD/.venv/bin:$PATH")
                elif program not in SYSTEM and not activated:
                    found.append(f"{where}: `{program}` is in .venv/bin: `source .venv/bin/activate` first "
                                 f"(in this section or the README's opening block), or write .venv/bin/{program}")
                name = program.rsplit("/", 1)[-1]
                if name == "make":
                    missing = [a for a in args if not a.startswith("-") and "=" not in a and a not in targets]
                    if missing:
                        found.append(f"{where}: no Makefile target {missing}")
                if name == "pipeline":
                    rest = list(args)
                    while rest and rest[0].startswith("-"):
                        rest = rest[2:] if rest[0] == "--params" else rest[1:]
                    if rest and rest[0] not in COMMANDS:
                        found.append(f"{where}: `pipeline {rest[0]}` is not a command")
    return found


def test_every_readme_command_runs_as_written():
    text = (REPO / "README.md").read_text()
    assert bash_blocks(text), "no ```bash blocks found in README.md"
    assert problems(text) == []


def test_the_check_catches_bare_venv_commands():
    bare = "# t\n\n## Retraining\n\n```bash\ndvc exp show\n.venv/bin/dvc exp run -S a=1\nmake nosuch\n```\n"
    found = problems(bare)
    assert len(found) == 3, found
    fixed = ("# t\n\n```bash\nmake demo\nsource .venv/bin/activate\n```\n## Retraining\n\n```bash\ndvc exp show\n"
             "pipeline --params params.yaml bench demo\n```\n")
    assert problems(fixed) == []
    scoped = "# t\n\n## A\n\n```bash\nsource .venv/bin/activate\ndvc exp show\n```\n## B\n\n```bash\ndvc exp show\n```\n"
    assert [p.split(" ")[0] for p in problems(scoped)] == ["README.md:12"]  # B only
