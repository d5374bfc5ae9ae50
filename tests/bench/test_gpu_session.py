"""bench/gpu_session.sh, the script a lent GPU runs, parses on a CPU.

A lease is 15 minutes, all calls together: a misspelt flag or a renamed test file found there
costs one. Every command the script runs is parsed here with the tool's own argument parser
(and, for the sweep, its own validation of shapes, implementations, branches and dtypes); the
test files it names must exist.
"""
from __future__ import annotations

import os
import re
import shlex

import pytest

from bench import sweep
from bench.studies import goals, rga_net_step

from paths import REPO_ROOT

ROOT = REPO_ROOT
SCRIPT = os.path.join(ROOT, "bench", "gpu_session.sh")


def commands() -> list[list[str]]:
    """Every ``python ...`` command of the script as argv, continuations joined, without the
    environment assignments and ``timeout N`` before it or the redirections and pipe after it."""
    text = re.sub(r"\\\n\s*", " ", open(SCRIPT).read())
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0] if line.lstrip().startswith("#") else line
        for match in re.finditer(r"\bpython (.*?)(?:\||;;|\|\||$)", line):
            out.append([a for a in shlex.split(match.group(1)) if not re.fullmatch(r"\d?>.*", a)])
    return out


def by_tool(name: str) -> list[list[str]]:
    return [argv[1:] for argv in commands() if argv[0] == name]


def test_the_script_is_found_and_read():
    # the three tools below and pytest, in the steps "all", "tests", "tune", "train", "step", "paper"
    assert len(by_tool("bench/sweep.py")) >= 6
    assert by_tool("bench/studies/rga_net_step.py") and by_tool("bench/studies/compile_threads.py")
    assert len(by_tool("bench/studies/goals.py")) == 4
    assert [argv for argv in by_tool("-m") if argv[0] == "pytest"]


@pytest.mark.parametrize("argv", by_tool("bench/sweep.py"), ids=" ".join)
def test_sweep_commands_parse(argv):
    parser = sweep.build_parser()
    args = parser.parse_args([*argv, "--device", "cpu", "--quiet"])     # the GPU's flags, resolved here
    device, names, cases = sweep.resolve_args(args, parser)
    assert names and cases


@pytest.mark.parametrize("argv", by_tool("bench/studies/rga_net_step.py"), ids=" ".join)
def test_rga_net_step_commands_parse(argv):
    rga_net_step.parse_args(argv)


@pytest.mark.parametrize("argv", by_tool("bench/studies/goals.py"), ids=lambda argv: " ".join(argv) or "default")
def test_goals_commands_parse(argv):
    goals.build_parser().parse_args(argv)


@pytest.mark.parametrize("argv", by_tool("bench/studies/compile_threads.py"), ids=" ".join)
def test_compile_threads_commands_parse(argv):
    flags = dict(zip(argv[::2], argv[1::2]))
    assert set(flags) <= {"--cases", "--threads"} and all(int(v) > 0 for v in flags.values())


@pytest.mark.parametrize("argv", [a for a in by_tool("-m") if a[0] == "pytest"], ids=" ".join)
def test_pytest_commands_name_existing_tests(argv):
    paths = [a for a in argv[1:] if a.startswith("tests")]
    assert paths, argv
    for path in paths:
        assert os.path.exists(os.path.join(ROOT, path)), path
    if "-m" in argv:        # a marker expression over markers pyproject.toml declares
        expression = argv[argv.index("-m") + 1]
        declared = open(os.path.join(ROOT, "pyproject.toml")).read()
        for word in re.findall(r"\w+", expression):
            assert word in ("not", "and", "or") or f'"{word}:' in declared, word
