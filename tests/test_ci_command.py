"""The README's test command is what CI runs (`.ci/run`), and it tests both ends of the declared transformers range:
the newest release, then the pinned oldest, which must be pyproject's lower bound."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version


ROOT = Path(__file__).resolve().parents[1]


def readme_command() -> str:
    """The command exactly as `.ci/run` extracts it."""
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def declared_transformers() -> SpecifierSet:
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M)[1]
    return SpecifierSet(re.search(r'"transformers([^"]*)"', dependencies)[1])


def test_readme_command_tests_the_newest_and_the_oldest_declared_transformers():
    command = readme_command()
    assert "\n" not in command  # one copy-pastable line
    steps = [step.strip() for step in command.split("&&")]
    pins = [i for i, step in enumerate(steps) if re.fullmatch(r"pip install transformers==\S+", step)]
    runs = [i for i, step in enumerate(steps) if step == "python -m pytest -q"]
    install = steps.index('pip install -e ".[test]"')  # unpinned: the newest transformers the range allows
    assert len(pins) == 1 and len(runs) == 2, steps
    assert install < runs[0] < pins[0] < runs[1], steps

    pinned = Version(steps[pins[0]].split("==")[1])
    lower = [Version(s.version) for s in declared_transformers() if s.operator == ">="]
    assert lower == [pinned], (declared_transformers(), pinned)  # the pin is the declared lower bound, exactly
    assert pinned in declared_transformers()


def test_installed_transformers_is_in_the_declared_range():
    assert Version(transformers.__version__) in declared_transformers()


def _ci_with_command(tmp_path: Path, command: str) -> subprocess.CompletedProcess:
    (tmp_path / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "README.md").write_text(f"# x\n\n<!-- test-command -->\n```bash\n{command}\n```\n\n```bash\nfalse\n```\n")
    return subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, cwd=tmp_path)


def test_ci_fails_when_either_pass_fails(tmp_path):
    for i, command in enumerate(["true && true", "false && true", "true && false", "true && exit 3"]):
        proc = _ci_with_command(tmp_path / str(i), command)
        assert (proc.returncode == 0) == (command == "true && true"), (command, proc.returncode, proc.stderr)
    assert proc.returncode == 3 and "CI FAILED" in proc.stderr


def test_ci_refuses_a_readme_without_the_command(tmp_path):
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "README.md").write_text("# no command here\n")
    proc = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True)
    assert proc.returncode != 0 and "no test command" in proc.stderr
