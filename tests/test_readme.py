"""The README stays true: its runnable example runs, and CI runs exactly its test command."""

import re
import shlex
import subprocess
import sys

from tests.conftest import REPO

README = (REPO / "README.md").read_text("utf-8")


def code_after(marker: str, lang: str) -> str:
    tail = README[README.index(marker):]
    return re.search(rf"```{lang}\n(.*?)```", tail, re.S).group(1)


def test_runnable_python_example():
    code = code_after("A runnable example with the embedded starter model", "python")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "'mode': 'loose'" in r.stdout


def test_ci_runs_the_readme_test_command():
    cmd = code_after("## Fresh machine: the tests", "bash").strip()
    assert cmd in (REPO / ".ci" / "run").read_text("utf-8")


def test_main_job_command_uses_the_embedded_model():
    cmd = code_after("## Fresh machine: the main job", "bash").strip()
    assert "--model" not in cmd and "qguard classify" in cmd


def test_main_job_output_shown_in_readme_is_what_it_prints():
    """The line the README says the main job prints is what the shipped starter model prints."""
    cmd = code_after("## Fresh machine: the main job", "bash").strip()
    args = re.search(r"qguard (classify .*)$", cmd).group(1)
    shown = re.search(r"with the shipped starter model:\n`([^`]+)`", README).group(1)
    r = subprocess.run([sys.executable, "-m", "qguard", *shlex.split(args)], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == shown


def test_calibration_example_runs_and_shows_the_shipped_temperatures():
    code = code_after("### Calibrated scores", "python")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    shown = re.search(r"# (\{'prompt'.*?\})", code).group(1)
    assert r.stdout.splitlines()[0] == shown and len(r.stdout.splitlines()) == 2
