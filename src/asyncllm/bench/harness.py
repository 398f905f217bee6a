"""``asyncllm bench``: plan the measuring processes, run them one after another, print and save the report.

Processes never overlap (they would compete for the same cores). asyncllm and the peer each run in
their own fresh process with the same torch thread count and the same prompt token ids.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from asyncllm.bench.settings import MEASUREMENTS, BenchSettings, parse_only
from asyncllm.bench.subproc import ChildOutcome, run_child
from asyncllm.bench.workload import (
    SESSION_SYSTEM,
    SINGLE_STREAM_RUNS,
    WorkloadSpec,
    chat_prompt_ids,
    kv_tokens_for,
    session_user_messages,
    single_round_keys,
    warmup_ids,
)

_COLD_MESSAGE = "Say hello in one short sentence."
_OURS_MISC_JOBS = ("issue", "session")
_HF_JOBS = ("throughput", "issue")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", default=None, help="a .gguf file or HF model directory (default: the SmolLM2 GGUF)")
    add("--requests", type=int, default=32, help="concurrent requests for throughput (default 32)")
    add("--tokens", type=int, default=128, help="new tokens per request (default 128)")
    add("--issue-requests", type=int, default=8,
        help="requests in the concurrent-vs-sequential comparison, at most --requests (default 8)")
    add("--only", type=parse_only, default=None, help=f"comma-separated subset of: {', '.join(MEASUREMENTS)}")
    add("--json", default=None, metavar="PATH", help="also write the full results as JSON")
    add("--skip-peer", action="store_true", help="skip the Hugging Face runs (their ratios show n/a)")
    add("--threads", type=int, default=None,
        help="torch threads for every measuring process (default: torch.get_num_threads())")
    add("--kv-cache-tokens", type=int, default=None,
        help="asyncllm KV pool in tokens (default: sized to hold the whole workload)")
    add("--session-tokens", type=int, default=1500, help="transcript length by the last turn (default 1500)")
    add("--session-turns", type=int, default=5, help="turns in the session measurement (default 5)")
    add("--session-reply-tokens", type=int, default=32, help="max tokens of each session reply (default 32)")
    add("--bandwidth-mb", type=int, default=512, help="MiB copied per bandwidth sample (default 512)")
    add("--timeout", type=int, default=3600, help="seconds allowed per measuring process (default 3600)")
    add("--check", action="store_true", help="exit with status 3 when a target is missed")


def add_bench_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on an ``argparse`` sub-parser collection; dispatch it with ``run_bench(args)``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="measure throughput, latency, session reuse, cold start and memory vs HF transformers",
    )
    add_bench_arguments(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncllm-bench",
        description="asyncllm vs Hugging Face transformers on the same model, machine and token ids.")
    add_bench_arguments(parser)
    return parser


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def build_workload(settings: BenchSettings, model: str, threads: int) -> WorkloadSpec:
    """Tokenize every input once with the model's own tokenizer and chat template."""
    from asyncllm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(model)
    prompts = chat_prompt_ids(tokenizer, settings.requests)
    kv_tokens = settings.kv_cache_tokens or kv_tokens_for(
        prompts, settings.tokens, session_tokens=settings.session_tokens,
        session_reply_tokens=settings.session_reply_tokens)
    return WorkloadSpec(
        model=model,
        threads=threads,
        kv_cache_tokens=kv_tokens,
        max_tokens=settings.tokens,
        prompts=prompts,
        issue_requests=min(settings.issue_requests, settings.requests),
        warmup_prompt=warmup_ids(tokenizer, max(len(p) for p in prompts)),
        cold_prompt=tokenizer.apply_chat_template([{"role": "user", "content": _COLD_MESSAGE}]),
        session_system=SESSION_SYSTEM,
        session_messages=session_user_messages(tokenizer, turns=settings.session_turns,
                                               total_tokens=settings.session_tokens,
                                               reply_tokens=settings.session_reply_tokens),
        session_reply_tokens=settings.session_reply_tokens,
        bandwidth_mb=settings.bandwidth_mb,
    )


def plan(settings: BenchSettings) -> list[tuple[str, str, list[str]]]:
    """The processes to run, in order, as (outcome key, task, jobs).

    The single-stream measurement runs as ``SINGLE_STREAM_RUNS`` rounds of one asyncllm process and one
    HF process back to back, so that both sides of each round see the same state of a shared machine.
    """
    tasks: list[tuple[str, str, list[str]]] = []
    if settings.wants("throughput") or settings.wants("memory"):
        tasks.append(("ours_throughput", "ours_throughput", []))
    misc = [job for job in _OURS_MISC_JOBS if settings.wants(job)]
    if misc:
        tasks.append(("ours_misc", "ours_misc", misc))
    hf = [job for job in _HF_JOBS if settings.wants(job)]
    if hf and not settings.skip_peer:
        tasks.append(("hf", "hf", hf))
    if settings.wants("single"):
        for round_index in range(1, SINGLE_STREAM_RUNS + 1):
            ours_key, hf_key = single_round_keys(round_index)
            tasks.append((ours_key, "ours_single", []))
            if not settings.skip_peer:
                tasks.append((hf_key, "hf", ["single"]))
    if settings.wants("cold"):
        tasks.append(("cold_asyncllm", "cold_asyncllm", []))
        if not settings.skip_peer:
            tasks.append(("cold_hf", "cold_hf", []))
    return tasks


def run_processes(settings: BenchSettings, spec: WorkloadSpec) -> dict[str, ChildOutcome]:
    outcomes: dict[str, ChildOutcome] = {}
    for key, task, jobs in plan(settings):
        label = key + (f" ({', '.join(jobs)})" if jobs else "")
        _log(f"running {label} in a fresh process ...")
        outcome = run_child(task, asdict(spec.with_jobs(jobs)), timeout_s=settings.timeout_s)
        state = "done" if outcome.ok else "FAILED"
        _log(f"{label}: {state} in {outcome.wall_s:.1f} s")
        if outcome.error is not None:
            _log(outcome.error.rstrip())
        outcomes[key] = outcome
    return outcomes


def resolve_model(model: str | None) -> str | None:
    """An absolute path for a local model (children run in a temporary directory), a hub id unchanged,
    or the default model's path (``None`` when it is not on this machine)."""
    if model:
        local = Path(model).expanduser()
        return str(local.resolve()) if local.exists() else model
    from asyncllm.assets import default_model_path

    path = default_model_path()
    return None if path is None else str(path)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``bench`` arguments.

    Exit status: 0 when every process finished; 1 when one failed (its rows show n/a) or the model is
    missing; 2 for an invalid argument value (the message names it); 3 with ``--check`` when every process
    finished but a target was missed.
    """
    import torch

    from asyncllm.assets import MISSING_DEFAULT_MODEL
    from asyncllm.bench.machine import collect_machine
    from asyncllm.bench.measurements import build_findings
    from asyncllm.bench.report import render_report, report_json, write_json

    try:
        settings = BenchSettings.from_args(args)
    except ValueError as exc:
        print(f"asyncllm bench: error: {exc}", file=sys.stderr)
        return 2
    model = resolve_model(settings.model)
    if model is None:
        print(MISSING_DEFAULT_MODEL, file=sys.stderr)
        return 1
    threads = settings.threads or torch.get_num_threads()
    start = time.perf_counter()
    spec = build_workload(settings, model, threads)
    _log(f"model {model}; torch threads {threads}; KV pool {spec.kv_cache_tokens} tokens; "
         f"prompts {min(map(len, spec.prompts))}-{max(map(len, spec.prompts))} tokens")
    machine = collect_machine(threads)  # first: builds the native kernels if this machine lacks them
    outcomes = run_processes(settings, spec)
    findings = build_findings(settings, outcomes)
    print(render_report(machine, settings, findings.rows, findings.notes), flush=True)
    if settings.json_path is not None:
        record = report_json(machine, settings, model, findings.rows, findings.notes, outcomes)
        write_json(settings.json_path, record)
        _log(f"wrote {settings.json_path}")
    _log(f"total {time.perf_counter() - start:.1f} s")
    if any(not outcome.ok for outcome in outcomes.values()):
        return 1
    if settings.check and any(row.verdict == "fail" for row in findings.rows):
        return 3
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench(build_parser().parse_args(argv))
