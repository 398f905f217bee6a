"""The README's test command is the one CI runs, and the documented CLI commands exist."""

from __future__ import annotations

from pathlib import Path

from asyncllm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert command in readme
    assert "pytest" in command


def test_documented_cli_commands_parse() -> None:
    parser = build_parser()
    assert parser.parse_args(["chat"]).command == "chat"
    assert parser.parse_args(["generate", "default", "hi", "--max-tokens", "3"]).max_tokens == 3
    assert parser.parse_args(["fetch-default"]).command == "fetch-default"


def test_cli_reports_a_missing_model_without_a_traceback(capsys: object, tmp_path: Path) -> None:
    from asyncllm.cli import main

    assert main(["generate", str(tmp_path / "missing.gguf"), "hi"]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "missing.gguf" in err and "Traceback" not in err
