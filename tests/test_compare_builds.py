"""The two-build comparison: its ratio arithmetic, its process order, and its plumbing end to end on two
stand-in source trees whose ``asyncllm`` streams tokens at known speeds."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from asyncllm.bench.compare import (
    CompareSettings,
    MetricSummary,
    build_parser,
    main,
    plan,
    ratio,
    render_summary,
    run_comparison,
    settings_from_args,
    tree_src,
)

_FAKE_ASYNCLLM = '''
"""A stand-in asyncllm with the public API the comparison child uses; one token per DELAY seconds."""
import asyncio

__version__ = "stand-in"
DELAY = {delay}


class _Out:
    def __init__(self, token_ids):
        self.token_ids = token_ids


class AsyncEngine:
    @classmethod
    def from_pretrained(cls, model, *, device, kv_cache_tokens):
        assert device == "cpu" and kv_cache_tokens > 0
        return cls()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def stream_detailed(self, ids, *, max_tokens, temperature, ignore_eos):
        assert ids and temperature == 0.0 and ignore_eos
        for _ in range(max_tokens):
            await asyncio.sleep(DELAY)
            yield _Out([1])
'''


def _fake_tree(root: Path, delay: float) -> Path:
    package = root / "src" / "asyncllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(_FAKE_ASYNCLLM.format(delay=delay)))
    return root


def test_ratios_median_and_spread_skip_failed_rounds() -> None:
    summary = MetricSummary("single", "single-stream decode 1x128", [40.0, 50.0, None, 40.0],
                            [44.0, 45.0, 41.0, 40.0])
    assert summary.ratios == [pytest.approx(1.1), pytest.approx(0.9), None, pytest.approx(1.0)]
    assert summary.median_ratio == pytest.approx(1.0)
    assert summary.ratio_range == (pytest.approx(0.9), pytest.approx(1.1))
    assert summary.median_of("baseline") == pytest.approx(40.0)
    assert summary.median_of("candidate") == pytest.approx(42.5)
    record = summary.to_dict()
    assert record["median_ratio"] == pytest.approx(1.0) and record["min_ratio"] == pytest.approx(0.9)
    table = render_summary([summary])
    assert "1.000" in table and "0.900-1.100" in table and "3/4" in table
    assert ratio(None, 1.0) is None and ratio(1.0, 0.0) is None
    empty = MetricSummary("throughput", "t", [None], [None])
    assert empty.median_ratio is None and "n/a" in render_summary([empty])


def test_each_round_runs_baseline_then_candidate_for_each_metric() -> None:
    assert plan(2, ("single", "throughput")) == [
        (1, "single", "baseline"), (1, "single", "candidate"),
        (1, "throughput", "baseline"), (1, "throughput", "candidate"),
        (2, "single", "baseline"), (2, "single", "candidate"),
        (2, "throughput", "baseline"), (2, "throughput", "candidate"),
    ]


def test_settings_validate_and_quick_shrinks_only_what_was_not_set(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^rounds"):
        CompareSettings("a", "b", rounds=0)
    with pytest.raises(ValueError, match=r"^only"):
        CompareSettings("a", "b", metrics=())
    args = build_parser().parse_args(["--baseline", "a", "--candidate", "b", "--quick", "--tokens", "64"])
    quick = settings_from_args(args)
    assert (quick.rounds, quick.requests, quick.tokens) == (2, 4, 64)
    full = settings_from_args(build_parser().parse_args(["--baseline", "a", "--candidate", "b"]))
    assert (full.rounds, full.requests, full.tokens, full.warm) == (5, 32, 128, True)
    with pytest.raises(ValueError, match="not an asyncllm source tree"):
        tree_src(tmp_path)
    assert main(["--baseline", str(tmp_path), "--candidate", str(tmp_path)]) == 2


def test_each_build_runs_from_its_own_tree_and_ratios_follow_its_speed(tmp_path: Path) -> None:
    baseline = _fake_tree(tmp_path / "base", delay=0.02)
    candidate = _fake_tree(tmp_path / "cand", delay=0.01)
    settings = CompareSettings(str(baseline), str(candidate), rounds=1, requests=3, tokens=6, threads=1)
    job: dict[str, Any] = {"model": "stand-in", "threads": 1, "kv_cache_tokens": 1024, "max_tokens": 6,
                           "prompts": [[1, 2, 3], [4, 5], [6]], "warmup_prompt": [7, 8, 9]}
    lines: list[str] = []
    record = run_comparison(settings, job, echo=lines.append)
    assert record["failures"] == 0, record["processes"]
    for process in record["processes"]:
        tree = baseline if process["build"] == "baseline" else candidate
        assert Path(process["result"]["asyncllm_file"]).is_relative_to(tree.resolve())
    assert record["builds"]["baseline"]["native_kernels"].startswith("unknown")
    single, throughput = record["summaries"]
    assert single["candidate_tokens_per_s"][0] > 0 and throughput["baseline_tokens_per_s"][0] > 0
    # twice as fast per token: the ratio sits near 2 (sleeps only ever overshoot, pulling it towards 1)
    assert 1.3 < single["median_ratio"] < 2.6 and 1.3 < throughput["median_ratio"] < 2.6
    assert any(line.startswith("round 1/1  single-stream decode 1x6") for line in lines)
    assert any("aggregate throughput 3x6" in line for line in lines)
    json.dumps(record)  # the --json record is plain JSON
