"""The documentation keeps its promises: every ``--flag`` of a documented command exists in that
command's argument parser, every flag named alone exists in some parser, the names the Python
snippets import exist, every relative link in README.md and docs/*.md resolves (file and
heading), and README links every docs page.

Commands are the lines of ``bash``/``sh`` code blocks and the inline code spans that start with
a program. Each command's parser is captured in-process, once per program: the script, module or
console-script function runs with ``ArgumentParser.parse_known_args`` replaced by a function that
raises the parser, so nothing is trained or loaded. The Python snippets are checked by
``ruff format --check .``, which formats the markdown's code blocks.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import re
import runpy
import shlex
import sys
from importlib.metadata import entry_points
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
SEPARATORS = {"&&", "||", ";", "|"}
# Folders whose scripts the docs run with ``python path/to/script.py`` or ``python -m``.
SCRIPT_FOLDERS = ("training/", "scripts/", "benchmarks/", "experiments/", "examples/")
MODULE_PREFIXES = ("diffusers_mdit", "experiments", "benchmarks")
RUN_SH = {"demo": "mdit-demo", "sizes": "mdit-sizes"}  # ./run.sh test hands its flags to pytest


def strip_fences(text: str) -> str:
    return FENCE.sub("", text)


def shell_lines(text: str) -> list[str]:
    """Command lines of the shell code blocks (continuations joined) and inline code spans."""
    lines = []
    for language, body in FENCE.findall(text):
        if language in SHELL_LANGUAGES:
            lines += body.replace("\\\n", " ").splitlines()
    lines += INLINE_CODE.findall(strip_fences(text))
    return lines


def commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line, as token lists (comments dropped)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # an inline span that is not shell (unbalanced quotes)
        return []
    result, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            result.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in [*result, current] if c]


def resolve(tokens: list[str]) -> tuple[tuple[str, str], list[str]] | None:
    """``((kind, name), arguments)`` of a command this test knows how to check, else None."""
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", tokens[0]):
        tokens = tokens[1:]  # environment assignments
    if not tokens:
        return None
    program = tokens[0].rsplit("/", 1)[-1]
    if program in ("python", "python3") and len(tokens) > 1:
        if tokens[1] == "-m" and len(tokens) > 2:
            if tokens[2].startswith(MODULE_PREFIXES):
                return ("module", tokens[2]), tokens[3:]
            return None
        return script(tokens[1], tokens[2:])
    if program == "accelerate" and tokens[1:2] == ["launch"]:
        for i, token in enumerate(tokens):
            if token.endswith(".py"):
                return script(token, tokens[i + 1 :])
        return None
    if program.startswith("mdit-"):
        return ("console", program), tokens[1:]
    if tokens[0] == "./run.sh" and len(tokens) > 1 and tokens[1] in RUN_SH:
        return ("console", RUN_SH[tokens[1]]), tokens[2:]
    if tokens[0].endswith(".py"):
        return script(tokens[0], tokens[1:])
    return None


def script(path: str, arguments: list[str]) -> tuple[tuple[str, str], list[str]] | None:
    if path.startswith(SCRIPT_FOLDERS):
        return ("script", path), arguments
    if path.startswith("train_") and (ROOT / "training" / path).is_file():
        return ("script", f"training/{path}"), arguments  # "train_mdit.py --finetune ..." in prose
    return None


def documented_commands() -> list[tuple[Path, str, tuple[str, str], list[str]]]:
    found = []
    for page in PAGES:
        for line in shell_lines(page.read_text()):
            for tokens in commands(line):
                resolved = resolve(tokens)
                if resolved is not None:
                    found.append((page, line.strip(), *resolved))
    return found


class _Parser(BaseException):
    """Raised by the replaced ``parse_known_args``; a BaseException so that no ``except
    Exception`` (or the console scripts' user-error handling) swallows it."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _raise_parser(self, args=None, namespace=None):
    raise _Parser(self)


def console_scripts() -> dict[str, str]:
    """The installed package's console scripts (pyproject.toml's [project.scripts])."""
    return {
        e.name: e.value
        for e in entry_points().select(group="console_scripts")
        if e.value.startswith("diffusers_mdit")
    }


@functools.cache
def parser_of(kind: str, name: str) -> argparse.ArgumentParser:
    """The argument parser a command builds, captured without running the command."""
    saved_path, saved_argv = list(sys.path), list(sys.argv)
    sys.path.insert(0, str(ROOT))
    sys.argv = [name, "--help"]
    try:
        with mock.patch.object(argparse.ArgumentParser, "parse_known_args", _raise_parser):
            if kind == "script":
                path = ROOT / name
                assert path.is_file(), f"documented script {name} does not exist"
                sys.path.insert(0, str(path.parent))  # as `python path/to/script.py` does
                runpy.run_path(str(path), run_name="__main__")
            elif kind == "module":
                runpy.run_module(name, run_name="__main__", alter_sys=True)
            else:
                scripts = console_scripts()
                assert name in scripts, f"{name} is not a console script of diffusers-mdit"
                module, function = scripts[name].split(":")
                getattr(importlib.import_module(module), function)()
    except _Parser as captured:
        return captured.parser
    finally:
        sys.path[:], sys.argv[:] = saved_path, saved_argv
    raise AssertionError(f"{kind} {name} finished without parsing its arguments")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {
        name: sub
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, sub in action.choices.items()
    }


def options(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._option_string_actions)


def flags(arguments: list[str]) -> list[str]:
    return [
        a.split("=", 1)[0]
        for a in arguments
        if re.fullmatch(r"--[A-Za-z][\w-]*(=.*)?|-[A-Za-z]", a)
    ]


def unknown_flags(kind: str, name: str, arguments: list[str]) -> list[str]:
    """The flags in ``arguments`` that the command's parser (and its chosen subcommand) lacks."""
    parser = parser_of(kind, name)
    known = options(parser)
    subcommands = subparsers(parser)
    chosen = next((a for a in arguments if a in subcommands), None)
    if chosen is not None:
        known |= options(subcommands[chosen])
    return [flag for flag in flags(arguments) if flag not in known]


def test_every_documented_flag_exists_in_its_parser():
    found = documented_commands()
    targets = {target for _, _, target, _ in found}
    # the scan finds what the docs document (guards against a parser change that finds nothing)
    assert {("script", "training/train_mdit.py"), ("console", "mdit-explain")} <= targets
    assert ("module", "experiments.convergence") in targets
    assert len(found) > 40
    problems = [
        f"{page.relative_to(ROOT)}: {line!r}: {', '.join(unknown)}"
        for page, line, (kind, name), arguments in found
        if (unknown := unknown_flags(kind, name, arguments))
    ]
    assert not problems, "documented flags missing from their parsers:\n" + "\n".join(problems)


def test_flag_check_reports_a_flag_the_parser_lacks():
    (target, arguments) = resolve(
        shlex.split("accelerate launch --num_processes 2 training/train_mdit.py --no_such_flag 3")
    )
    assert target == ("script", "training/train_mdit.py")
    assert unknown_flags(*target, arguments) == ["--no_such_flag"]
    target, arguments = resolve(shlex.split("mdit-eval score out --metrics fid --num_samples 4"))
    # --num_samples belongs to `generate`, not to `score`
    assert unknown_flags(*target, arguments) == ["--num_samples"]


def all_known_flags() -> set[str]:
    known = set()
    for _, _, target, _ in documented_commands():
        parser = parser_of(*target)
        known |= options(parser)
        for sub in subparsers(parser).values():
            known |= options(sub)
    from accelerate.commands.launch import launch_command_parser

    return known | options(launch_command_parser())


def test_flags_named_alone_exist():
    """A flag in prose (`--snr_gamma 5`) is a promise too: it exists in some documented parser."""
    known = all_known_flags()
    problems = []
    for page in PAGES:
        for span in INLINE_CODE.findall(strip_fences(page.read_text())):
            if span.startswith("--"):
                for flag in flags(span.split()):
                    if flag not in known:
                        problems.append(f"{page.relative_to(ROOT)}: `{span}`")
    assert not problems, "flags named in the docs that no parser has:\n" + "\n".join(problems)


def test_python_snippets_import_what_exists():
    """The names a snippet imports exist (the snippets' layout is ruff's to check)."""
    missing, checked = [], 0
    for page in PAGES:
        for language, body in FENCE.findall(page.read_text()):
            if language != "python":
                continue
            for node in ast.walk(ast.parse(body)):
                if isinstance(node, ast.ImportFrom) and node.module.startswith("diffusers"):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        checked += 1
                        if not hasattr(module, alias.name):
                            missing.append(f"{page.relative_to(ROOT)}: {node.module}.{alias.name}")
    assert checked > 20
    assert not missing, "snippets import names that do not exist:\n" + "\n".join(missing)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()  # [text](url)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(strip_fences(page.read_text()))}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(strip_fences(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target} (no heading #{anchor})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_link_check_reports_missing_files_and_headings(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## DiT (the baseline)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[a](other.md#dit-the-baseline) [b](other.md#no-such) [c](gone.md) [d](#here)\n"
        "![e](https://example.com/x.png)\n\n```bash\n[f](not-a-link.md)\n```\n\n## Here\n"
    )
    assert broken_links(page) == [
        "other.md#no-such (no heading #no-such)",
        "gone.md (no such file)",
    ]


def test_readme_links_every_docs_page():
    linked = {
        (ROOT / target.partition("#")[0]).resolve()
        for target in LINK.findall((ROOT / "README.md").read_text())
    }
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README's table of contents does not link: {missing}"
