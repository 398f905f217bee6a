"""The ``asyncllm`` command line: options, validation before loading, and the chat commands."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

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


@pytest.fixture
def tiny_cli(make_tiny_engine: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list[Any]]:
    """``AsyncEngine.from_pretrained`` answers with the tiny engine; records the loads and the prompts sent.
    The default model path points at a file that is never read."""
    from asyncllm import cli
    from asyncllm.engine import AsyncEngine

    seen: dict[str, list[Any]] = {"loads": [], "prompts": []}

    def from_pretrained(model: Any, **overrides: Any) -> AsyncEngine:
        seen["loads"].append((str(model), overrides))
        return make_tiny_engine(**overrides)

    original = AsyncEngine.stream_detailed

    def stream_detailed(self: AsyncEngine, prompt: Any, **kwargs: Any) -> Any:
        seen["prompts"].append(prompt)
        return original(self, prompt, **kwargs)

    monkeypatch.setattr(AsyncEngine, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(AsyncEngine, "stream_detailed", stream_detailed)
    monkeypatch.setattr(cli, "default_model_path", lambda: tmp_path / "default.gguf")
    return seen


def test_generate_applies_the_chat_template_unless_raw(tiny_cli: dict[str, list[Any]],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "some/model", "Hello", "--max-tokens", "3", "--seed", "1"]
    assert main(base) == 0
    assert main([*base, "--raw"]) == 0
    assert main([*base, "--chat"]) == 0  # the old opt-in: accepted, changes nothing
    assert tiny_cli["prompts"] == [[{"role": "user", "content": "Hello"}], "Hello",
                                   [{"role": "user", "content": "Hello"}]]
    outputs = capsys.readouterr().out.splitlines()
    assert outputs[0] == outputs[2]
    with pytest.raises(SystemExit):
        main([*base, "--raw", "--chat"])


@pytest.mark.parametrize("command", [["chat", "default"], ["generate", "default", "hi"], ["chat"]])
def test_default_names_the_default_model(command: list[str], tiny_cli: dict[str, list[Any]],
                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\n"))
    assert main([*command, "--max-tokens", "2"]) == 0
    assert tiny_cli["loads"][0][0] == str(tmp_path / "default.gguf")
