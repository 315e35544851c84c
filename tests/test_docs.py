"""The README and docs say what runs: every `sedac-build` / `sedac-run` command line in their shell blocks
parses as written (click resolves the subcommand and checks every option, choice and required value without
running it), each named command answers --help, and every `make` target they name exists."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from sedac.cli.build import main as build_main
from sedac.cli.run import main as run_main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = {"sedac-build": build_main, "sedac-run": run_main}


def _shell_lines(path: Path) -> list[str]:
    """Commands in ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for line in _shell_lines(path):
            words = shlex.split(line)
            if words and words[0] in PROGRAMS and "[" not in line:  # [--optional] shows a choice, not a command
                found.append((f"{path.name}: {line}", words))
    return found


COMMANDS = _commands()


def test_the_docs_show_commands():
    named = {" ".join(words[:2]) for _, words in COMMANDS}
    assert {"sedac-run generate", "sedac-run serve", "sedac-run bench", "sedac-run triton"} <= named
    assert len(COMMANDS) >= 30


def _resolve(words: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """(the command a line runs, the words naming it, its arguments): subcommands resolved as click does."""
    command, name, args = PROGRAMS[words[0]], words[:1], words[1:]
    while isinstance(command, click.Group) and args and args[0] in command.commands:
        command, name, args = command.commands[args[0]], name + args[:1], args[1:]
    return command, name, args


@pytest.mark.parametrize("where,words", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_command_parses_as_written(where, words):
    command, name, args = _resolve(words)
    with command.make_context(" ".join(name), list(args)) as ctx:  # raises on a bad option or value
        assert ctx.command is command


@pytest.mark.parametrize("name", sorted({" ".join(_resolve(words)[1]) for _, words in COMMANDS}))
def test_named_command_answers_help(name):
    program, *subcommands = name.split()
    done = subprocess.run(
        [str(Path(sys.executable).parent / program), *subcommands, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "Usage:" in done.stdout, done.stderr


def test_make_targets_named_in_the_docs_exist():
    targets = {m for path in DOCS for line in _shell_lines(path) for m in re.findall(r"^make ([\w-]+)", line)}
    assert {"demo", "test", "bench"} <= targets
    for target in targets:
        done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (target, done.stderr)


def test_readme_python_runs_on_the_real_engine(real_engine, monkeypatch, capsys):
    """The README's Python API block, as written (it names engines/smollm2, the real engine's directory)."""
    block = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    assert "LLM(" in block
    monkeypatch.chdir(ROOT)
    exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
