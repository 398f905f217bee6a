"""Print the benchmark table and write its JSON record."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from asyncllm.bench.machine import MachineInfo
from asyncllm.bench.results import Row, format_ratio, format_value
from asyncllm.bench.settings import BenchSettings
from asyncllm.bench.subproc import ChildOutcome

HEADER = ("#", "metric", "asyncllm", "peer", "ratio", "target", "result", "peer is")


def table_cells(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    """The header plus one tuple of cell strings per row."""
    cells = [HEADER]
    for row in rows:
        cells.append((
            row.measurement, row.metric, format_value(row.ours, row.unit), format_value(row.peer, row.unit),
            format_ratio(row.ratio), row.target.describe(row.unit), row.verdict, row.peer_label,
        ))
    return cells


def render_table(rows: Sequence[Row]) -> str:
    cells = table_cells(rows)
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADER))]

    def line(values: Sequence[str]) -> str:
        return " | ".join(value.ljust(width) for value, width in zip(values, widths, strict=True)).rstrip()

    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule, *(line(values) for values in cells[1:])])


def peers_line(settings: BenchSettings, llamacpp_skip: str | None) -> str:
    """Which peers ran: HF transformers unless ``--skip-peer``; llama.cpp (single stream only) unless
    ``llamacpp_skip`` says why not."""
    hf = "HF transformers skipped (--skip-peer)" if settings.skip_peer else (
        "HF transformers, same model and token ids")
    if not settings.wants("single"):
        return hf
    llama = (f"llama.cpp skipped ({llamacpp_skip})" if llamacpp_skip is not None
             else "llama.cpp for the single stream, same .gguf and token ids")
    return f"{hf}; {llama}"


def render_report(
    machine: MachineInfo, settings: BenchSettings, rows: Sequence[Row], notes: Sequence[str], *,
    llamacpp_skip: str | None = None,
) -> str:
    peer = peers_line(settings, llamacpp_skip)
    workload = (f"workload: {settings.requests} requests x {settings.tokens} new tokens, greedy, "
                f"EOS ignored, chat-template prompts")
    if settings.wants("session"):
        workload += f"; session: {settings.session_turns} turns to ~{settings.session_tokens} tokens"
    head = ["asyncllm benchmark", machine.describe(), f"{workload}; peers: {peer}",
            f"measurements: {', '.join(settings.only)}", ""]
    tail = ["", "ratio = times better than the peer column (ours/peer for tok/s, peer/ours for s and MB); "
            "a '<= Nx peer' target bounds ours/peer instead."]
    tail += notes
    return "\n".join([*head, render_table(rows), *tail])


def report_json(machine: MachineInfo, settings: BenchSettings, model: str, rows: Sequence[Row],
                notes: Sequence[str], outcomes: Mapping[str, ChildOutcome], *,
                llamacpp_skip: str | None = None) -> dict[str, Any]:
    return {
        "machine": machine.to_dict(),
        "model": model,
        "settings": {
            "requests": settings.requests, "tokens": settings.tokens,
            "issue_requests": settings.issue_requests,
            "only": list(settings.only), "skip_peer": settings.skip_peer,
            "skip_llamacpp": settings.skip_llamacpp, "compare_dequantized": settings.compare_dequantized,
            "session_tokens": settings.session_tokens, "session_turns": settings.session_turns,
            "session_reply_tokens": settings.session_reply_tokens, "bandwidth_mb": settings.bandwidth_mb,
        },
        "llamacpp_skipped": llamacpp_skip,
        "rows": [row.to_dict() for row in rows],
        "notes": list(notes),
        "processes": {
            task: {"task": outcome.task, "wall_s": outcome.wall_s, "result": outcome.result,
                   "error": outcome.error}
            for task, outcome in outcomes.items()
        },
    }


def write_json(path: str | Path, record: Mapping[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2) + "\n")
