"""``asyncllm bench``: plan the measuring processes, run them one after another, print and save the report.

Processes never overlap (they would compete for the same cores). asyncllm and each peer (HF transformers;
llama.cpp for a ``.gguf`` model when ``llama-cpp-python`` is installed) run in their own fresh process
with the same thread count and the same prompt token ids. A peer that cannot run is skipped with a
message; its ratios show ``n/a`` and the rest of the run proceeds.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from asyncllm.bench import peers_llamacpp
from asyncllm.bench.settings import (
    KV_CACHE_DTYPES,
    KV_CACHE_ROUNDS,
    KV_NEW_TOKENS,
    MEASUREMENTS,
    BenchSettings,
    parse_only,
)
from asyncllm.bench.subproc import ChildOutcome, run_child
from asyncllm.bench.workload import (
    SESSION_SYSTEM,
    SINGLE_STREAM_RUNS,
    WorkloadSpec,
    chat_prompt_ids,
    kv_tokens_for,
    llamacpp_round_key,
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
    add("--skip-llamacpp", action="store_true",
        help="skip the llama.cpp single-stream runs (their ratio shows n/a)")
    add("--compare-dequantized", action="store_true",
        help="also run the throughput workload on a dequantize_weights=True load and report packed vs dense")
    add("--threads", type=int, default=None, metavar="N",
        help="threads for every measuring process: torch threads, llama.cpp n_threads "
             "(default: the engine's default, the CPUs this process may use)")
    add("--kv-cache-tokens", type=int, default=None,
        help="asyncllm KV pool in tokens (default: sized to hold the whole workload)")
    add("--session-tokens", type=int, default=1500, help="transcript length by the last turn (default 1500)")
    add("--session-turns", type=int, default=5, help="turns in the session measurement (default 5)")
    add("--session-reply-tokens", type=int, default=32, help="max tokens of each session reply (default 32)")
    add("--bandwidth-mb", type=int, default=512, help="MiB copied per bandwidth sample (default 512)")
    add("--timeout", type=int, default=3600, help="seconds allowed per measuring process (default 3600)")
    add("--check", action="store_true", help="exit with status 3 when a target is missed")
    add("--kv-budget-mb", type=int, default=96,
        help="KV memory budget (MB, all layers) of the kvcache measurement (default 96)")
    add("--kv-sequences", type=int, default=16,
        help="concurrent sequences submitted in the kvcache measurement (default 16)")
    add("--kv-sequence-tokens", type=int, default=1024,
        help="length each kvcache sequence reaches, prompt plus 32 new tokens (default 1024)")


def add_bench_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on an ``argparse`` sub-parser collection; dispatch it with ``run_bench(args)``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="measure throughput, latency, session reuse, cold start and memory vs HF transformers "
                      "(and single-stream decode vs llama.cpp)",
    )
    add_bench_arguments(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncllm-bench",
        description="asyncllm vs Hugging Face transformers (and llama.cpp) on the same model, machine and "
                    "token ids.")
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
        kv_budget_bytes=settings.kv_budget_mb * 10**6,
        kv_sequences=settings.kv_sequences,
        kv_sequence_tokens=settings.kv_sequence_tokens,
        kv_new_tokens=KV_NEW_TOKENS,
    )


def plan(settings: BenchSettings, *, llamacpp: bool) -> list[tuple[str, str, list[str]]]:
    """The processes to run, in order, as (outcome key, task, jobs); ``llamacpp``: whether the llama.cpp
    peer can run (see ``peers_llamacpp.skip_reason``).

    The single-stream measurement runs as ``SINGLE_STREAM_RUNS`` rounds of one asyncllm process, one HF
    process and one llama.cpp process back to back, so that every side of a round sees the same state of a
    shared machine. The dequantized throughput process runs right after the packed one; without it, the
    memory measurement's dense weight bytes come from a process that only loads.
    """
    tasks: list[tuple[str, str, list[str]]] = []
    if settings.wants("throughput") or settings.wants("memory"):
        tasks.append(("ours_throughput", "ours_throughput", []))
    if settings.compare_dequantized:
        tasks.append(("ours_throughput_dense", "ours_throughput_dense", []))
    elif settings.wants("memory"):
        tasks.append(("ours_weights_dense", "ours_weights_dense", []))
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
            if llamacpp:
                tasks.append((llamacpp_round_key(round_index), peers_llamacpp.TASK, []))
    if settings.wants("kvcache"):
        for round_index in range(1, KV_CACHE_ROUNDS + 1):  # the dtypes back to back, in rounds, so each sees
            for dtype in KV_CACHE_DTYPES:                  # the same states of a shared machine
                tasks.append((f"kvcache_{dtype}_{round_index}", "ours_kvcache", [dtype]))
    if settings.wants("contention"):
        tasks.append(("ours_contention", "ours_contention", []))
    if settings.wants("cold"):
        tasks.append(("cold_asyncllm", "cold_asyncllm", []))
        if not settings.skip_peer:
            tasks.append(("cold_hf", "cold_hf", []))
    return tasks


def died_of_illegal_instruction(outcome: ChildOutcome) -> bool:
    return outcome.returncode == -signal.SIGILL


def run_processes(
    settings: BenchSettings, spec: WorkloadSpec, *, llamacpp: bool
) -> tuple[dict[str, ChildOutcome], list[str]]:
    """Every planned process's outcome by key, and notes on how the run deviated from the plan.

    A llama.cpp process with the library's defaults that dies of SIGILL (ggml's AMX kernels fault on
    some machines) is rerun at once with the extra weight buffer types off, and so are the later rounds.
    """
    outcomes: dict[str, ChildOutcome] = {}
    notes: list[str] = []
    llamacpp_task = peers_llamacpp.TASK
    for key, task, jobs in plan(settings, llamacpp=llamacpp):
        if task == peers_llamacpp.TASK:
            task = llamacpp_task
        label = key + (f" ({', '.join(jobs)})" if jobs else "")
        _log(f"running {label} in a fresh process ...")
        outcome = run_child(task, asdict(spec.with_jobs(jobs)), timeout_s=settings.timeout_s)
        if task == peers_llamacpp.TASK and died_of_illegal_instruction(outcome):
            llamacpp_task = peers_llamacpp.TASK_NO_EXTRA_BUFFERS
            message = ("llama.cpp died of an illegal instruction (SIGILL) with its default weight buffer "
                       "types; its rounds run with use_extra_bufts=False (no AMX, no repacked weights)")
            _log(message)
            notes.append(f"[2] {message}")
            outcome = run_child(llamacpp_task, asdict(spec.with_jobs(jobs)), timeout_s=settings.timeout_s)
        state = "done" if outcome.ok else "FAILED"
        _log(f"{label}: {state} in {outcome.wall_s:.1f} s")
        if outcome.error is not None:
            _log(outcome.error.rstrip())
        outcomes[key] = outcome
    return outcomes, notes


def llamacpp_skip(settings: BenchSettings, model: str) -> str | None:
    """Why the llama.cpp rounds do not run (``None`` when they do)."""
    if not settings.wants("single"):
        return "the single measurement is not selected"
    if settings.skip_llamacpp:
        return "--skip-llamacpp"
    return peers_llamacpp.skip_reason(model)


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
    from asyncllm.assets import MISSING_DEFAULT_MODEL
    from asyncllm.bench.machine import collect_machine
    from asyncllm.bench.measurements import build_findings
    from asyncllm.bench.report import render_report, report_json, write_json
    from asyncllm.cpu_threads import default_num_threads

    try:
        settings = BenchSettings.from_args(args)
    except ValueError as exc:
        print(f"asyncllm bench: error: {exc}", file=sys.stderr)
        return 2
    model = resolve_model(settings.model)
    if model is None:
        print(MISSING_DEFAULT_MODEL, file=sys.stderr)
        return 1
    threads = settings.threads or default_num_threads()
    start = time.perf_counter()
    spec = build_workload(settings, model, threads)
    _log(f"model {model}; torch threads {threads}; KV pool {spec.kv_cache_tokens} tokens; "
         f"prompts {min(map(len, spec.prompts))}-{max(map(len, spec.prompts))} tokens")
    skip = llamacpp_skip(settings, model)
    if skip is not None and settings.wants("single"):
        _log(peers_llamacpp.skip_message(skip))
    machine = collect_machine(threads)  # first: builds the native kernels if this machine lacks them
    outcomes, run_notes = run_processes(settings, spec, llamacpp=skip is None)
    if skip is not None and settings.wants("single"):
        run_notes.insert(0, f"[2] {peers_llamacpp.skip_message(skip)}")
    findings = build_findings(settings, outcomes, run_notes)
    print(render_report(machine, settings, findings.rows, findings.notes, llamacpp_skip=skip), flush=True)
    if settings.json_path is not None:
        record = report_json(machine, settings, model, findings.rows, findings.notes, outcomes,
                             llamacpp_skip=skip)
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
