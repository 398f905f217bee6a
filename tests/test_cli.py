"""The ``asyncllm`` command line: options, validation before loading, and the chat commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from asyncllm.cli import main, package_version

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"asyncllm {package_version()}"
    assert out.split()[1][0].isdigit()


def test_python_dash_m_version() -> None:
    done = subprocess.run([sys.executable, "-m", "asyncllm", "--version"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""}, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"asyncllm {package_version()}"
