"""Two builds of asyncllm side by side: ``asyncllm bench``'s single-stream decode and aggregate throughput,
measured for a baseline and a candidate source tree in one run.

Every measurement runs in a fresh process (``compare_child.py``) whose ``PYTHONPATH`` is the tree's
``src``, so ``import asyncllm`` loads that tree; both trees receive the same job: model, torch threads,
KV pool and prompt token ids (tokenized once, here). The processes alternate, baseline then candidate,
for each measurement of each round, so both sides of a round see the same state of a shared machine;
each round gives one ratio candidate / baseline per measurement (tok/s, so above 1 is faster), and the
summary is the median ratio with its min-max over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from asyncllm.bench.subproc import ChildOutcome, run_child

CHILD_SOURCE = Path(__file__).with_name("compare_child.py")
BUILDS: tuple[str, str] = ("baseline", "candidate")
METRICS: tuple[str, ...] = ("single", "throughput")
"""``single``: one request's decode speed (tokens after the first over the time from the first output to
the last); ``throughput``: ``requests`` concurrent requests x ``tokens`` tokens, all streamed tokens over
the elapsed time. Both as ``asyncllm bench`` measures them (its rows 2 and 1)."""
QUICK_ROUNDS, QUICK_REQUESTS, QUICK_TOKENS = 2, 4, 16
DEFAULT_ROUNDS, DEFAULT_REQUESTS, DEFAULT_TOKENS = 5, 32, 128


def metric_label(metric: str, requests: int, tokens: int) -> str:
    if metric == "single":
        return f"single-stream decode 1x{tokens}"
    if metric == "throughput":
        return f"aggregate throughput {requests}x{tokens}"
    raise ValueError(f"metric: unknown {metric!r}; known {list(METRICS)}")


def tree_src(tree: str | Path) -> Path:
    """``tree/src``, the directory put on a child's ``PYTHONPATH``; raises when it holds no asyncllm."""
    src = Path(tree).expanduser().resolve() / "src"
    if not (src / "asyncllm" / "__init__.py").is_file():
        raise ValueError(f"{tree}: not an asyncllm source tree (no src/asyncllm/__init__.py)")
    return src


def git_describe(tree: Path) -> str:
    """The tree's commit (short hash, ``+dirty`` when tracked files changed), or ``not a git tree``."""
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git tree"
    return head + ("+dirty" if dirty else "")


def load_average() -> str:
    """The machine's 1/5/15-minute load averages beside its CPU count: a load above the cores means other
    work competed with the measurements (and widens the ratios' spread)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f} (1/5/15 min) on {os.cpu_count() or 1} CPUs"


@dataclass(frozen=True)
class CompareSettings:
    """One comparison's parameters. Invariants: every count is positive; ``metrics`` is a non-empty
    subset of ``METRICS``, in ``METRICS`` order."""

    baseline: str
    candidate: str
    rounds: int = DEFAULT_ROUNDS
    requests: int = DEFAULT_REQUESTS
    tokens: int = DEFAULT_TOKENS
    threads: int | None = None
    metrics: tuple[str, ...] = METRICS
    model: str | None = None
    warm: bool = True
    timeout_s: int = 1800
    json_path: str | None = None
    fail_below: float | None = None

    def __post_init__(self) -> None:
        for name in ("rounds", "requests", "tokens", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads: must be positive, got {self.threads}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"only: expected a non-empty subset of {list(METRICS)}, got {list(self.metrics)}")
        object.__setattr__(self, "metrics", tuple(m for m in METRICS if m in self.metrics))
        if self.fail_below is not None and self.fail_below <= 0:
            raise ValueError(f"fail_below: must be positive, got {self.fail_below}")


def plan(rounds: int, metrics: Sequence[str]) -> list[tuple[int, str, str]]:
    """The timed processes, in order, as ``(round, metric, build)``: in each round, each metric's
    baseline process right before its candidate process."""
    return [(r, metric, build) for r in range(1, rounds + 1) for metric in metrics for build in BUILDS]


def ratio(candidate: float | None, baseline: float | None) -> float | None:
    """``candidate / baseline``, or ``None`` when either is missing or the baseline is not positive."""
    if candidate is None or baseline is None or baseline <= 0:
        return None
    return candidate / baseline


@dataclass(frozen=True)
class MetricSummary:
    """One metric over the rounds: each side's tok/s per round (``None`` where its process failed) and
    the per-round ratios candidate / baseline."""

    metric: str
    label: str
    baseline: list[float | None]
    candidate: list[float | None]
    ratios: list[float | None] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.baseline) != len(self.candidate):
            raise ValueError("baseline, candidate: need one value per round each")
        object.__setattr__(self, "ratios", [ratio(c, b) for b, c in zip(self.baseline, self.candidate,
                                                                         strict=True)])

    @property
    def valid_ratios(self) -> list[float]:
        return [r for r in self.ratios if r is not None]

    @property
    def median_ratio(self) -> float | None:
        valid = self.valid_ratios
        return statistics.median(valid) if valid else None

    @property
    def ratio_range(self) -> tuple[float, float] | None:
        valid = self.valid_ratios
        return (min(valid), max(valid)) if valid else None

    def median_of(self, build: str) -> float | None:
        values = [v for v in (self.baseline if build == "baseline" else self.candidate) if v is not None]
        return statistics.median(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        spread = self.ratio_range
        return {
            "metric": self.metric,
            "label": self.label,
            "unit": "tok/s",
            "baseline_tokens_per_s": self.baseline,
            "candidate_tokens_per_s": self.candidate,
            "ratios": self.ratios,
            "median_ratio": self.median_ratio,
            "min_ratio": None if spread is None else spread[0],
            "max_ratio": None if spread is None else spread[1],
            "baseline_median_tokens_per_s": self.median_of("baseline"),
            "candidate_median_tokens_per_s": self.median_of("candidate"),
        }


def summarize(settings: CompareSettings, outcomes: dict[tuple[int, str, str], ChildOutcome]) -> list[MetricSummary]:
    """One summary per metric from the timed outcomes, keyed as ``plan`` orders them."""

    def value(r: int, metric: str, build: str) -> float | None:
        outcome = outcomes.get((r, metric, build))
        if outcome is None or outcome.result is None:
            return None
        speed = outcome.result.get("tokens_per_s")
        return None if speed is None else float(speed)

    rounds = range(1, settings.rounds + 1)
    return [
        MetricSummary(metric, metric_label(metric, settings.requests, settings.tokens),
                      [value(r, metric, "baseline") for r in rounds], [value(r, metric, "candidate") for r in rounds])
        for metric in settings.metrics
    ]


def _speed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} tok/s"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def round_line(r: int, rounds: int, label: str, baseline: float | None, candidate: float | None) -> str:
    return (f"round {r}/{rounds}  {label:<32} baseline {_speed(baseline):>12}  candidate {_speed(candidate):>12}"
            f"  ratio {_ratio(ratio(candidate, baseline))}")


def render_summary(summaries: Sequence[MetricSummary]) -> str:
    """The final table: each side's median tok/s, the median ratio and the ratios' min-max."""
    header = ("metric", "baseline (median)", "candidate (median)", "median ratio", "ratio min-max", "rounds")
    rows = [header]
    for s in summaries:
        spread = s.ratio_range
        rows.append((
            s.label, _speed(s.median_of("baseline")), _speed(s.median_of("candidate")), _ratio(s.median_ratio),
            "n/a" if spread is None else f"{spread[0]:.3f}-{spread[1]:.3f}",
            f"{len(s.valid_ratios)}/{len(s.ratios)}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    return "\n".join([line(rows[0]), "-+-".join("-" * w for w in widths), *(line(row) for row in rows[1:])])


def _log(message: str) -> None:
    print(f"[compare] {message}", file=sys.stderr, flush=True)


def build_job(model: str, threads: int, requests: int, tokens: int) -> dict[str, Any]:
    """The job both trees receive: prompts tokenized once with the model's own chat template, a warm-up
    prompt sharing no prefix with them, and the KV pool ``asyncllm bench`` sizes for the same workload."""
    from asyncllm.bench.settings import BenchSettings
    from asyncllm.bench.workload import chat_prompt_ids, kv_tokens_for, warmup_ids
    from asyncllm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(model)
    prompts = chat_prompt_ids(tokenizer, requests)
    defaults = BenchSettings()
    kv_tokens = kv_tokens_for(prompts, tokens, session_tokens=defaults.session_tokens,
                              session_reply_tokens=defaults.session_reply_tokens)
    return {
        "model": model,
        "threads": threads,
        "kv_cache_tokens": kv_tokens,
        "max_tokens": tokens,
        "prompts": prompts,
        "warmup_prompt": warmup_ids(tokenizer, max(len(p) for p in prompts)),
    }


Runner = Callable[..., ChildOutcome]


def run_comparison(settings: CompareSettings, job: dict[str, Any], *, runner: Runner = run_child,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Warm each build once (unless ``settings.warm`` is off), then run ``plan``'s processes one after
    another, echoing each round's numbers as they arrive; returns the JSON-able record of the run."""
    srcs = {"baseline": tree_src(settings.baseline), "candidate": tree_src(settings.candidate)}
    source = CHILD_SOURCE.read_text()
    builds: dict[str, dict[str, Any]] = {
        build: {"tree": str(src.parent), "git": git_describe(src.parent)} for build, src in srcs.items()}

    def launch(task: str, build: str, spec: dict[str, Any]) -> ChildOutcome:
        spec = {**spec, "expect_src": str(srcs[build])}
        outcome = runner(task, spec, timeout_s=settings.timeout_s, source=source,
                         env={"PYTHONPATH": str(srcs[build])})
        if outcome.error is not None:
            _log(f"{build} {task} FAILED after {outcome.wall_s:.1f} s:\n{outcome.error.rstrip()}")
        return outcome

    failures = 0
    if settings.warm:
        for build in BUILDS:
            _log(f"warming the {build} build ({builds[build]['tree']}) ...")
            outcome = launch("warm", build, job)
            failures += not outcome.ok
            if outcome.result is not None:
                builds[build].update({k: outcome.result.get(k) for k in ("asyncllm_file", "native_kernels")})
    for build in BUILDS:
        kernels = builds[build].get("native_kernels")
        echo(f"{build}: {builds[build]['tree']} (git {builds[build]['git']}"
             f"{f'; native CPU kernels {kernels}' if kernels else ''})")
    prompt_lengths = [len(p) for p in job["prompts"]]
    echo(f"workload: model {job['model']}; torch threads {job['threads']}; KV pool {job['kv_cache_tokens']} "
         f"tokens; prompts {min(prompt_lengths)}-{max(prompt_lengths)} tokens; {settings.rounds} rounds, each "
         "measurement in a fresh process, baseline then candidate")
    echo(f"load average before: {load_average()}")
    echo("ratio = candidate / baseline (tok/s: above 1 is faster)")

    outcomes: dict[tuple[int, str, str], ChildOutcome] = {}
    for r, metric, build in plan(settings.rounds, settings.metrics):
        label = metric_label(metric, settings.requests, settings.tokens)
        _log(f"round {r}/{settings.rounds}: {label}, {build} ...")
        outcome = launch(metric, build, job)
        failures += not outcome.ok
        outcomes[(r, metric, build)] = outcome
        if build == BUILDS[-1]:
            speeds = [outcomes[(r, metric, b)].result for b in BUILDS]
            base, cand = ((s or {}).get("tokens_per_s") for s in speeds)
            echo(round_line(r, settings.rounds, label, base, cand))

    summaries = summarize(settings, outcomes)
    echo("")
    echo(render_summary(summaries))
    echo(f"load average after: {load_average()}")
    return {
        "settings": asdict(settings),
        "builds": builds,
        "workload": {k: job[k] for k in ("model", "threads", "kv_cache_tokens", "max_tokens")}
        | {"requests": len(job["prompts"]), "prompt_tokens": prompt_lengths},
        "summaries": [s.to_dict() for s in summaries],
        "processes": [
            {"round": r, "metric": metric, "build": build, "wall_s": o.wall_s, "result": o.result, "error": o.error}
            for (r, metric, build), o in outcomes.items()
        ],
        "failures": failures,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compare_builds",
        description="Single-stream decode and aggregate throughput of two asyncllm source trees, measured "
                    "alternately in fresh processes in one run; prints per-round ratios candidate / baseline.")
    add = parser.add_argument
    add("--baseline", required=True, help="the reference source tree (holds src/asyncllm)")
    add("--candidate", required=True, help="the source tree under test (holds src/asyncllm)")
    add("--rounds", type=int, default=None, help=f"rounds (default {DEFAULT_ROUNDS}; {QUICK_ROUNDS} with --quick)")
    add("--requests", type=int, default=None,
        help=f"concurrent requests for throughput (default {DEFAULT_REQUESTS}; {QUICK_REQUESTS} with --quick)")
    add("--tokens", type=int, default=None,
        help=f"new tokens per request (default {DEFAULT_TOKENS}; {QUICK_TOKENS} with --quick)")
    add("--threads", type=int, default=None,
        help="torch threads for every measuring process (default: torch.get_num_threads())")
    add("--only", choices=METRICS, default=None, help="measure one metric only")
    add("--model", default=None, help="a .gguf file or HF model directory (default: the SmolLM2 GGUF)")
    add("--quick", action="store_true",
        help=f"a short run to check the plumbing: {QUICK_ROUNDS} rounds of {QUICK_REQUESTS}x{QUICK_TOKENS} "
             "unless set explicitly")
    add("--skip-warmup", action="store_true",
        help="skip the untimed process per build that builds its native kernels before any timing")
    add("--timeout", type=int, default=1800, help="seconds allowed per measuring process (default 1800)")
    add("--json", default=None, metavar="PATH", help="also write the full results as JSON")
    add("--fail-below", type=float, default=None, metavar="RATIO",
        help="exit with status 3 when a metric's median ratio is below RATIO (e.g. 0.95)")
    return parser


def settings_from_args(args: argparse.Namespace) -> CompareSettings:
    def pick(value: int | None, default: int, quick: int) -> int:
        if value is not None:
            return value
        return quick if args.quick else default

    return CompareSettings(
        baseline=args.baseline,
        candidate=args.candidate,
        rounds=pick(args.rounds, DEFAULT_ROUNDS, QUICK_ROUNDS),
        requests=pick(args.requests, DEFAULT_REQUESTS, QUICK_REQUESTS),
        tokens=pick(args.tokens, DEFAULT_TOKENS, QUICK_TOKENS),
        threads=args.threads,
        metrics=(args.only,) if args.only else METRICS,
        model=args.model,
        warm=not args.skip_warmup,
        timeout_s=args.timeout,
        json_path=args.json,
        fail_below=args.fail_below,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 when every process finished; 1 when one failed (its values show n/a) or the model is
    missing; 2 for an invalid argument; 3 with ``--fail-below`` when a median ratio is below it."""
    import torch

    from asyncllm.assets import MISSING_DEFAULT_MODEL
    from asyncllm.bench.harness import resolve_model
    from asyncllm.bench.machine import collect_machine

    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        tree_src(settings.baseline)
        tree_src(settings.candidate)
    except ValueError as exc:
        print(f"compare_builds: error: {exc}", file=sys.stderr)
        return 2
    model = resolve_model(settings.model)
    if model is None:
        print(MISSING_DEFAULT_MODEL, file=sys.stderr)
        return 1
    start = time.perf_counter()
    threads = settings.threads or torch.get_num_threads()
    job = build_job(model, threads, settings.requests, settings.tokens)
    machine = collect_machine(threads)
    print(machine.describe(), flush=True)
    record = run_comparison(settings, job, echo=lambda line: print(line, flush=True))
    record["machine"] = machine.to_dict()
    if settings.json_path is not None:
        Path(settings.json_path).write_text(json.dumps(record, indent=2) + "\n")
        _log(f"wrote {settings.json_path}")
    _log(f"total {time.perf_counter() - start:.1f} s")
    if record["failures"]:
        return 1
    if settings.fail_below is not None and any(
            s["median_ratio"] is not None and s["median_ratio"] < settings.fail_below for s in record["summaries"]):
        return 3
    return 0
