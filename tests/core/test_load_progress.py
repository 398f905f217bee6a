"""The loading progress bar: on a terminal after the delay, never on a pipe or with ``load_progress=False``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from asyncllm import load_progress
from asyncllm.load_progress import loading_progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_once_the_delay_has_passed() -> None:
    out = FakeTerminal()
    assert list(loading_progress(range(5), total=5, stream=out, delay_s=0)) == [0, 1, 2, 3, 4]
    assert "loading tensors" in out.getvalue() and "0/5" in out.getvalue()


def test_no_bar_before_the_delay_or_off_a_terminal() -> None:
    fast = FakeTerminal()
    assert list(loading_progress(range(5), total=5, stream=fast, delay_s=60)) == [0, 1, 2, 3, 4]
    assert fast.getvalue() == ""
    pipe = io.StringIO()
    assert list(loading_progress(range(5), total=5, stream=pipe, delay_s=0)) == [0, 1, 2, 3, 4]
    assert pipe.getvalue() == ""


@pytest.mark.parametrize("progress", [True, False])
def test_from_pretrained_shows_the_bar_unless_load_progress_is_off(
    progress: bool, tiny_hf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncllm import AsyncEngine

    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(load_progress, "DELAY_S", 0.0)
    engine = AsyncEngine.from_pretrained(tiny_hf_dir, device="cpu", kv_cache_tokens=256, load_progress=progress)
    engine_shut(engine)
    assert ("loading tensors" in terminal.getvalue()) is progress


def engine_shut(engine: Any) -> None:
    import asyncio

    asyncio.run(engine.aclose())


def test_quiet_option_turns_the_bar_off() -> None:
    from asyncllm.cli import build_parser
    from asyncllm.cli_options import engine_overrides

    for command in (["chat"], ["generate", "m", "hi"], ["serve", "m"], ["gradio", "m"]):
        quiet = build_parser().parse_args([*command, "--quiet"])
        assert engine_overrides(quiet)["load_progress"] is False
        assert "load_progress" not in engine_overrides(build_parser().parse_args(command))
