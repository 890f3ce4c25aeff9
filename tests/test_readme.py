"""The README runs as written.

Every ```python block is executed, in order, each in a fresh namespace (a block must be
self-contained: its imports and inputs are in it), on CPU, in seconds. Every command line
of a ```bash block that calls a driver (``python python/search.py``, ``python
python/retrain.py``, ``python -m adarts_kernels.profiling``) is parsed by that driver's
own argument parser, so a flag the README shows exists; ``--help`` of each runs. The README
cites only files a clone has.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(lang: str):
    return [m.group(2) for m in BLOCK.finditer(README) if m.group(1) == lang]


def _driver(name: str):
    """The command module ``python/<name>.py`` runs (``adarts-<name>`` once installed)."""
    return importlib.import_module(f"adarts_kernels.commands.{name}")


def _parsers():
    from adarts_kernels.profiling.__main__ import build_parser as profiling_parser
    return {"python/search.py": _driver("search").build_parser(),
            "python/retrain.py": _driver("retrain").build_parser(),
            "-m adarts_kernels.profiling": profiling_parser()}


PY_BLOCKS = blocks("python")


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def test_the_readme_has_code_blocks():
    assert len(PY_BLOCKS) >= 3 and blocks("bash")


@pytest.mark.parametrize("i", range(len(PY_BLOCKS)))
def test_python_block_runs(i, capsys):
    torch.manual_seed(0)
    code = compile(PY_BLOCKS[i], f"README.md python block {i + 1}", "exec")
    exec(code, {"__name__": f"readme_block_{i + 1}"})


def _driver_commands():
    cmds = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.match(r"python (python/search\.py|python/retrain\.py|-m adarts_kernels\.profiling)(.*)$", line)
            if m:
                # "[--download]" marks an optional flag, "..." an elision: both stand for flags shown elsewhere
                args = m.group(2).replace("[", "").replace("]", "").replace("...", "")
                cmds.append((m.group(1), shlex.split(args)))
    return cmds


def test_every_driver_command_of_the_readme_parses():
    cmds = _driver_commands()
    assert {c for c, _ in cmds} == {"python/search.py", "python/retrain.py", "-m adarts_kernels.profiling"}
    parsers = _parsers()
    for cmd, args in cmds:
        parser = parsers[cmd]
        parser.exit_on_error = False
        try:
            parser.parse_args(args)
        except (argparse.ArgumentError, SystemExit) as e:
            raise AssertionError(f"README: `python {cmd} {' '.join(args)}` does not parse: {e}") from None


def test_help_shows_every_default_and_documents_every_option():
    for name, parser in _parsers().items():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings}: no help text"
            shown = parser._get_formatter()._expand_help(action) if action.help else ""
            full = parser._get_formatter()._get_help_string(action)
            assert "default" in full.lower(), f"{name} {action.option_strings}: default not shown: {shown!r}"
        assert "SPEC" not in text and "../shared" not in text, name


@pytest.mark.parametrize("cmd", [["python/search.py"], ["python/retrain.py"], ["-m", "adarts_kernels.profiling"]])
def test_help_runs(cmd, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = [str(REPO / cmd[0])] if cmd[0].endswith(".py") else cmd
    res = subprocess.run([sys.executable, *script, "--help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout and "(default:" in res.stdout
    assert os.listdir(tmp_path) == []     # --help writes nothing


def test_readme_cites_only_files_in_the_repository():
    assert "../shared" not in README and not re.search(r"\bSPEC section", README)
    for ref in set(re.findall(r"\]\(([^)#\s]+)\)", README)):        # markdown links and images
        if "://" not in ref:
            assert (REPO / ref).exists(), f"README links to {ref}, which the repository does not have"
    for ref in set(re.findall(r"`((?:docs|benchmarks|python|tests|csrc|adarts_kernels)/[\w./-]+\.\w+)`", README)):
        if "<" not in ref:
            assert (REPO / ref).exists(), f"README cites {ref}, which the repository does not have"
