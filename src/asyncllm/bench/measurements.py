"""Turn the measuring processes' raw results into table rows and context notes.

Nothing here measures: every number comes from a child's result; a missing result yields ``None``
(printed ``n/a``) and a note saying which process failed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from asyncllm.bench.results import REPORT_ONLY, Row, Target
from asyncllm.bench.settings import KV_CACHE_DTYPES, KV_CACHE_ROUNDS, MEMORY_HEADROOM_BYTES, BenchSettings
from asyncllm.bench.subproc import ChildOutcome
from asyncllm.bench.workload import SINGLE_STREAM_RUNS, llamacpp_round_key, median_decode_run, single_round_keys

MB = 1e6
GB = 1e9
DENSE_LABEL = "asyncllm dequantize_weights=True"

Outcomes = Mapping[str, ChildOutcome]
Raw = Mapping[str, Any]


@dataclass
class Findings:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def get(data: Raw | None, *path: str) -> Any:
    """``data[path[0]][path[1]]...``, or ``None`` where any step is missing."""
    node: Any = data
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _result(outcomes: Outcomes, task: str) -> dict[str, Any] | None:
    outcome = outcomes.get(task)
    return outcome.result if outcome is not None else None


def decode_context(single: Raw | None) -> float | None:
    """Mean context of the timed decode steps: the prompt, the first token, and half the tokens after it."""
    prompt = get(single, "prompt_tokens")
    decoded = get(single, "decode_tokens")
    if prompt is None or decoded is None:
        return None
    return float(prompt) + 1.0 + float(decoded) / 2.0


@dataclass(frozen=True)
class Roofline:
    bytes_per_step: float
    achieved_bytes_per_s: float
    fraction: float


def roofline(footprint: Raw | None, single: Raw | None, bandwidth: float | None) -> Roofline | None:
    """Bytes per decode step (weights + KV at the mean context) times steps per second, over bandwidth."""
    weights = get(footprint, "weight_bytes")
    kv_per_token = get(footprint, "kv_bytes_per_token")
    steps_per_s = get(single, "decode_tokens_per_s")
    context = decode_context(single)
    if weights is None or kv_per_token is None or steps_per_s is None or context is None or not bandwidth:
        return None
    per_step = float(weights) + float(kv_per_token) * context
    achieved = per_step * float(steps_per_s)
    return Roofline(per_step, achieved, achieved / bandwidth)


def flops_per_token(footprint: Raw | None, context: float) -> float | None:
    base = get(footprint, "decode_flops_per_token_ctx0")
    per_context_token = get(footprint, "decode_flops_per_context_token")
    if base is None or per_context_token is None:
        return None
    return float(base) + float(per_context_token) * context


def _span(counts: list[int]) -> str:
    return f"{min(counts)}-{max(counts)}" if counts else "none"


def throughput_findings(settings: BenchSettings, outcomes: Outcomes, out: Findings) -> None:
    ours = _result(outcomes, "ours_throughput")
    hf = get(_result(outcomes, "hf"), "throughput")
    peer = "HF generate_batch"
    shape = f"{settings.requests}x{settings.tokens}"
    out.rows.append(Row("1", f"aggregate throughput {shape}", "tok/s", get(ours, "tokens_per_s"),
                        get(hf, "tokens_per_s"), True, Target("ratio_at_least", 5.0), peer))
    if settings.compare_dequantized:
        dense = _result(outcomes, "ours_throughput_dense")
        out.rows.append(Row("1", f"aggregate throughput {shape}, packed vs dequantized", "tok/s",
                            get(ours, "tokens_per_s"), get(dense, "tokens_per_s"), True, REPORT_ONLY,
                            DENSE_LABEL))
        if dense is not None:
            out.notes.append(
                f"[1] asyncllm dequantized: {dense['generated_tokens']} tokens "
                f"({_span(dense['tokens_per_request'])} per request) in {dense['elapsed_s']:.2f} s; "
                f"{dense['num_preemptions']} preemptions; {dense['weight_bytes'] / MB:.0f} MB of stored weights "
                f"(compute dtype {dense['dtype']}); peak RSS {dense['peak_rss_bytes'] / MB:.0f} MB")
    out.rows += [
        Row("1", "TTFT mean, concurrent batch", "s", get(ours, "ttft_mean_s"), get(hf, "ttft_mean_s"),
            False, REPORT_ONLY, peer),
        Row("1", "TTFT p50, concurrent batch", "s", get(ours, "ttft_p50_s"), get(hf, "ttft_p50_s"),
            False, REPORT_ONLY, peer),
    ]
    if ours is not None:
        elapsed, weights = ours["elapsed_s"], ours["weight_bytes"]
        steps = max(ours["tokens_per_request"], default=0)
        context = ours["prompt_tokens"] / ours["requests"] + settings.tokens / 2
        line = (f"[1] asyncllm: {ours['generated_tokens']} tokens ({_span(ours['tokens_per_request'])} per "
                f"request) in {elapsed:.2f} s; {ours['prompt_tokens']} prompt tokens; "
                f"{ours['num_preemptions']} preemptions; {weights / MB:.0f} MB of stored weights (compute dtype "
                f"{ours['dtype']}) read once per batched step: >= {weights * steps / elapsed / GB:.2f} GB/s of "
                f"weight traffic")
        flops = flops_per_token(ours, context)
        if flops is not None:
            line += (f"; ~{flops / GB:.3f} GFLOP per decode token at context {context:.0f}, "
                     f"~{flops * ours['tokens_per_s'] / GB:.1f} GFLOP/s")
        out.notes.append(line)
    if hf is not None:
        out.notes.append(
            f"[1] HF: {hf['generated_tokens']} tokens ({_span(hf['tokens_per_request'])} per request) in "
            f"{hf['elapsed_s']:.2f} s, first request created to last finished (the whole generate_batch "
            f"call, manager start-up and shut-down included, took {hf['call_s']:.2f} s)")


def issue_findings(settings: BenchSettings, outcomes: Outcomes, out: Findings) -> None:
    ours = get(_result(outcomes, "ours_misc"), "issue")
    hf = get(_result(outcomes, "hf"), "issue")
    shape = f"{min(settings.issue_requests, settings.requests)}x{settings.tokens}"
    out.rows.append(Row("1b", f"concurrent {shape} vs one at a time", "tok/s", get(ours, "tokens_per_s"),
                        get(hf, "tokens_per_s"), True, REPORT_ONLY, "HF generate, sequential"))
    if ours is not None and hf is not None:
        out.notes.append(f"[1b] asyncllm {ours['generated_tokens']} tokens in {ours['elapsed_s']:.2f} s; "
                         f"HF {hf['generated_tokens']} tokens in {hf['elapsed_s']:.2f} s")


def _round_results(outcomes: Outcomes, key: Callable[[int], str]) -> list[Raw]:
    keys = [key(index) for index in range(1, SINGLE_STREAM_RUNS + 1)]
    return [result for result in (_result(outcomes, name) for name in keys) if result is not None]


def _median_single(results: Sequence[Raw]) -> dict[str, Any] | None:
    """The median-speed run over the rounds that finished, every round's speed attached."""
    return median_decode_run([result["single"] for result in results]) if results else None


def single_findings(settings: BenchSettings, outcomes: Outcomes, out: Findings) -> None:
    ours_rounds = _round_results(outcomes, lambda index: single_round_keys(index)[0])
    hf_rounds = _round_results(outcomes, lambda index: single_round_keys(index)[1])
    llama_rounds = _round_results(outcomes, llamacpp_round_key)
    misc = ours_rounds[0] if ours_rounds else None  # weights, KV bytes: the same in every round
    hf_all = hf_rounds[0] if hf_rounds else None
    ours, hf, llama = _median_single(ours_rounds), _median_single(hf_rounds), _median_single(llama_rounds)
    if ours is not None and misc is not None:  # the roofline's bandwidth: the median of every round's samples
        samples = [sample for result in ours_rounds for sample in result["bandwidth_samples_bytes_per_s"]]
        ours.update(bandwidth_bytes_per_s=statistics.median_low(samples), bandwidth_samples_bytes_per_s=samples,
                    bandwidth_copy_bytes=misc["bandwidth_copy_bytes"], bandwidth_repeats=misc["bandwidth_repeats"])
    peer = "HF generate, batch 1"
    bandwidth = get(ours, "bandwidth_bytes_per_s")
    ours_roof = roofline(misc, ours, bandwidth)
    hf_roof = roofline(hf_all, hf, bandwidth)
    out.rows += [
        Row("2", f"single-stream decode 1x{settings.tokens}", "tok/s", get(ours, "decode_tokens_per_s"),
            get(hf, "decode_tokens_per_s"), True, Target("ratio_at_least", 2.0), peer),
        Row("2", f"single-stream decode 1x{settings.tokens}, llama.cpp peer", "tok/s",
            get(ours, "decode_tokens_per_s"), get(llama, "decode_tokens_per_s"), True,
            Target("ratio_at_least", 1.0), "llama.cpp, same .gguf, batch 1"),
        Row("2", "decode bandwidth / roofline", "fraction", ours_roof.fraction if ours_roof else None,
            hf_roof.fraction if hf_roof else None, True, Target("ours_at_least", 0.6), peer),
    ]
    spreads = [f"{name} {', '.join(f'{speed:.1f}' for speed in side['runs_decode_tokens_per_s'])}"
               for name, side in (("asyncllm", ours), ("HF", hf), ("llama.cpp", llama))
               if side is not None and side.get("runs_decode_tokens_per_s")]
    if spreads:
        out.notes.append(f"[2] decode tok/s of each round, asyncllm, HF and llama.cpp back to back in fresh "
                         f"processes (the median run counts): {'; '.join(spreads)}")
    if llama_rounds:
        first = llama_rounds[0]
        buffers = "default" if first["extra_buffers"] else "off (use_extra_bufts=False)"
        out.notes.append(
            f"[2] llama.cpp (llama-cpp-python {first['version']}): n_threads = n_threads_batch = "
            f"{first['threads']}, n_ctx {first['n_ctx']}, n_batch {first['n_batch']}, extra weight buffer "
            f"types {buffers}; {first['weight_bytes'] / MB:.1f} MB of model tensors; greedy, "
            f"{settings.tokens} tokens, decode timed from the first token as for asyncllm")
    context = decode_context(ours)
    if ours is not None and misc is not None and ours_roof is not None and context is not None:
        sample_mib = ours["bandwidth_copy_bytes"] / 2 / 2**20
        samples = ours.get("bandwidth_samples_bytes_per_s") or [ours["bandwidth_bytes_per_s"]]
        line = (f"[2] copy bandwidth {ours['bandwidth_bytes_per_s'] / GB:.2f} GB/s (median of "
                f"{len(samples)} samples, before and after each asyncllm run: "
                f"{', '.join(f'{sample / GB:.1f}' for sample in samples)}; each the fastest of "
                f"{ours['bandwidth_repeats']} copies of {sample_mib:.0f} MiB fp32, bytes read + written); "
                f"asyncllm reads {ours_roof.bytes_per_step / MB:.1f} MB/step (weights "
                f"{misc['weight_bytes'] / MB:.1f} MB + KV {misc['kv_bytes_per_token'] / 1e3:.1f} KB/token x "
                f"{context:.0f} tokens): {ours_roof.achieved_bytes_per_s / GB:.2f} GB/s achieved")
        flops = flops_per_token(misc, context)
        if flops is not None:
            line += f"; ~{flops / GB:.3f} GFLOP/token, {flops * ours['decode_tokens_per_s'] / GB:.1f} GFLOP/s"
        out.notes.append(line)
    if hf_roof is not None and hf_all is not None:
        out.notes.append(f"[2] HF reads {hf_roof.bytes_per_step / MB:.1f} MB/step by the same count: "
                         f"{hf_roof.achieved_bytes_per_s / GB:.2f} GB/s achieved "
                         f"(attention {hf_all['attn_implementation']})")


def contention_findings(settings: BenchSettings, outcomes: Outcomes, out: Findings) -> None:
    """Decode beside busy processes: its speed as a fraction of the quiet speed (same threads), and against
    the quiet speed on one thread, of which it should keep at least half."""
    result = _result(outcomes, "ours_contention")
    contended = get(result, "contended", "decode_tokens_per_s")
    busy = get(result, "competitors")
    label = f"{busy} busy processes" if busy is not None else "busy processes"
    out.rows += [
        Row("2c", f"single-stream decode 1x{settings.tokens} beside {label}", "tok/s", contended,
            get(result, "quiet", "decode_tokens_per_s"), True, REPORT_ONLY, "the same, quiet machine"),
        Row("2c", f"single-stream decode 1x{settings.tokens} beside {label}, vs 1 thread", "tok/s", contended,
            get(result, "quiet_one_thread", "decode_tokens_per_s"), True, Target("ratio_at_least", 0.5),
            "quiet machine, 1 thread"),
    ]
    if result is not None:
        env = ", ".join(f"{k}={v}" for k, v in result["openmp_env"].items()) or "none set"
        ends = "; ".join(f"{name} {get(result, name, 'threads_at_end')}"
                         for name in ("quiet", "contended", "quiet_one_thread"))
        out.notes.append(f"[2c] {result['threads']} threads, each run a fresh engine after a warm-up; "
                         f"competitors: {result['competitors']} Python processes spinning in a loop, one per "
                         f"CPU of this process's affinity; OpenMP wait settings: {env}; engine threads at the "
                         f"end of each run (the thread governor lowers them under contention): {ends}")


def session_findings(settings: BenchSettings, outcomes: Outcomes, out: Findings) -> None:
    result = get(_result(outcomes, "ours_misc"), "session")
    session, stateless = get(result, "session"), get(result, "stateless")
    prompt = get(session, "prompt_tokens")
    size = f"{prompt}-token transcript" if prompt is not None else f"~{settings.session_tokens} tokens"
    out.rows.append(Row("3", f"TTFT of session turn {settings.session_turns} ({size})", "s",
                        get(session, "ttft_s"), get(stateless, "ttft_s"), False,
                        Target("ratio_at_least", 10.0), "asyncllm stateless, no prefix cache"))
    if session is not None and stateless is not None:
        line = (f"[3] last turn: {session['prompt_tokens']} prompt tokens, {session['cached_tokens']} reused "
                f"({session['prompt_tokens'] - session['cached_tokens']} new) "
                f"from the session; stateless: {stateless['prompt_tokens']} prompt tokens, "
                f"{stateless['cached_tokens']} cached")
        if session["prompt_tokens"] != stateless["prompt_tokens"]:
            line += " (WARNING: the two prompts differ in length)"
        out.notes.append(line)


def cold_findings(settings: BenchSettings, outcomes: Outcomes, out: Findings) -> None:
    ours, hf = _result(outcomes, "cold_asyncllm"), _result(outcomes, "cold_hf")
    out.rows.append(Row("4", "cold start: import + load + first token", "s", get(ours, "total_s"),
                        get(hf, "total_s"), False, Target("ratio_at_least", 3.0),
                        "HF from_pretrained + generate"))
    for name, result, task in (("asyncllm", ours, "cold_asyncllm"), ("HF", hf, "cold_hf")):
        if result is not None:
            out.notes.append(f"[4] {name}: import {result['import_s']:.2f} s, load {result['load_s']:.2f} s, "
                             f"first token {result['first_token_s']:.2f} s "
                             f"(process wall time {outcomes[task].wall_s:.2f} s)")


def _megabytes(value: Any) -> float | None:
    return None if value is None else float(value) / MB


def memory_findings(settings: BenchSettings, outcomes: Outcomes, out: Findings) -> None:
    ours = _result(outcomes, "ours_throughput")
    dense = _result(outcomes, "ours_throughput_dense") or _result(outcomes, "ours_weights_dense")
    peak = get(ours, "peak_rss_bytes")
    budget = None if ours is None else ours["weight_bytes"] + ours["kv_pool_bytes"] + MEMORY_HEADROOM_BYTES
    dense_dtype = get(dense, "dtype")
    out.rows += [
        Row("5", f"peak RSS of the {settings.requests}x{settings.tokens} process", "MB",
            None if peak is None else peak / MB, None if budget is None else budget / MB, False,
            Target("ratio_at_least", 1.0), "budget: weights + KV pool + 600 MB"),
        Row("5", "weight bytes, default (packed) vs dequantized load", "MB",
            _megabytes(get(ours, "weight_bytes")), _megabytes(get(dense, "weight_bytes")), False,
            Target("share_at_most", 0.35), DENSE_LABEL + (f" ({dense_dtype})" if dense_dtype else "")),
    ]
    if ours is not None and dense is not None and ours["weight_bytes"] == dense["weight_bytes"]:
        out.notes.append("[5] the default and the dequantized load hold the same weight bytes: the model has "
                         "no weight-only quantized tensors")
    if ours is not None:
        run_peak = ours["peak_rss_run_bytes"]
        run_text = "n/a (peak reset not permitted)" if run_peak is None else f"{run_peak / MB:.0f} MB"
        out.notes.append(
            f"[5] peak RSS {ours['peak_rss_bytes'] / MB:.0f} MB (by the end of loading "
            f"{ours['peak_rss_load_bytes'] / MB:.0f} MB, during warm-up and the timed run {run_text}); "
            f"budget = weights {ours['weight_bytes'] / MB:.0f} MB + KV pool "
            f"{ours['kv_pool_bytes'] / MB:.0f} MB ({ours['kv_pool_tokens']} tokens) + "
            f"{MEMORY_HEADROOM_BYTES / MB:.0f} MB")


def _kvcache_value(outcomes: Outcomes, dtype: str, part: str, key: str) -> float | None:
    """The median over the rounds of ``result[part][key]`` of the ``kvcache`` processes of ``dtype``."""
    values = [get(get(_result(outcomes, f"kvcache_{dtype}_{r}"), part), key) for r in range(1, KV_CACHE_ROUNDS + 1)]
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def kvcache_findings(settings: BenchSettings, outcomes: Outcomes, out: Findings) -> None:
    budget = f"{settings.kv_budget_mb} MB KV"
    plain_name = next((get(_result(outcomes, f"kvcache_auto_{r}"), "kv_cache_dtype")
                       for r in range(1, KV_CACHE_ROUNDS + 1) if _result(outcomes, f"kvcache_auto_{r}")), "auto")
    label = f"unquantized ({plain_name}) cache"
    admitted = {"int8": 1.8, "int4": 3.0, "k8v4": 2.2}  # at least, vs the unquantized cache
    for name in KV_CACHE_DTYPES[1:]:
        out.rows += [
            Row("6", f"{name}: {settings.kv_sequence_tokens}-token sequences running at once ({budget})", "seqs",
                _kvcache_value(outcomes, name, "batch", "peak_running"),
                _kvcache_value(outcomes, "auto", "batch", "peak_running"), True,
                Target("ratio_at_least", admitted[name]), label),
            Row("6", f"{name}: aggregate tok/s, {settings.kv_sequences} sequences ({budget})", "tok/s",
                _kvcache_value(outcomes, name, "batch", "tokens_per_s"),
                _kvcache_value(outcomes, "auto", "batch", "tokens_per_s"), True, REPORT_ONLY, label),
            Row("6", f"{name}: single-stream decode", "tok/s",
                _kvcache_value(outcomes, name, "single", "decode_tokens_per_s"),
                _kvcache_value(outcomes, "auto", "single", "decode_tokens_per_s"), True,
                Target("ratio_at_least", 0.9), label),
        ]
    for name in KV_CACHE_DTYPES:
        runs = [r for r in (_result(outcomes, f"kvcache_{name}_{i}") for i in range(1, KV_CACHE_ROUNDS + 1)) if r]
        if not runs:
            continue
        first = runs[0]
        rounds = "; ".join(
            f"{r['batch']['peak_running']} of {r['batch']['requests']} at once, {r['batch']['num_preemptions']} "
            f"preemptions, {r['batch']['tokens_per_s']:.1f} tok/s, single {r['single']['decode_tokens_per_s']:.1f} "
            f"tok/s" for r in runs)
        out.notes.append(
            f"[6] {first['kv_cache_dtype']}: {first['kv_bytes_per_token']} bytes/token (all layers, with scales), "
            f"{first['kv_capacity_tokens']} tokens in {first['budget_bytes'] / MB:.0f} MB; rounds (medians above): "
            f"{rounds}")


_BUILDERS: dict[str, Callable[[BenchSettings, Outcomes, Findings], None]] = {
    "throughput": throughput_findings,
    "issue": issue_findings,
    "single": single_findings,
    "contention": contention_findings,
    "session": session_findings,
    "cold": cold_findings,
    "memory": memory_findings,
    "kvcache": kvcache_findings,
}


def build_findings(settings: BenchSettings, outcomes: Outcomes, run_notes: Sequence[str] = ()) -> Findings:
    """Rows and notes for every selected measurement, then ``run_notes`` (how the run went: peers skipped,
    fallbacks), one note per failed process and one on the thread counts the processes reported (torch
    threads; llama.cpp's ``n_threads``)."""
    findings = Findings()
    for name in settings.only:
        _BUILDERS[name](settings, outcomes, findings)
    findings.notes.extend(run_notes)
    for task, outcome in outcomes.items():
        if outcome.error is not None:
            lines = outcome.error.strip().splitlines()
            findings.notes.append(f"ERROR: process '{task}' failed: {lines[0] if lines else 'no message'}")
    threads = {task: get(o.result, "threads") for task, o in outcomes.items() if o.result is not None}
    if len(set(threads.values())) > 1:
        findings.notes.append(f"WARNING: thread counts differ between processes: {threads}")
    elif threads:
        count = next(iter(threads.values()))
        findings.notes.append(f"every measuring process ran with {count} threads (torch threads; llama.cpp "
                              f"n_threads)")
    return findings
