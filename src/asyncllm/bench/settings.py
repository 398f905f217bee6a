"""What a benchmark run measures and at which size: one validated, frozen value built from the CLI."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

MEASUREMENTS: tuple[str, ...] = ("throughput", "issue", "single", "contention", "session", "cold", "memory",
                                 "kvcache")
"""Measurement names accepted by ``--only``, in the order the report prints them.

``throughput``: N concurrent requests x M tokens vs HF ``generate_batch`` (and, with
``compare_dequantized``, vs asyncllm's own dequantized load); ``issue``: a smaller concurrent batch vs HF
``generate`` run one request after another; ``single``: one request's decode speed vs HF ``generate`` and
vs llama.cpp on the same ``.gguf``, plus the memory-bandwidth roofline; ``contention``: one request's decode
speed beside one busy process per CPU, as a fraction of the quiet speed and of the quiet speed on one
thread; ``session``: TTFT of the last turn
of a long chat inside a ``Session`` vs the same transcript sent stateless with prefix caching off;
``cold``: import + load + first token in fresh processes vs HF; ``memory``: peak RSS of the throughput
process vs its budget, and the weight bytes of the default (packed) load vs the dequantized one;
``kvcache``: at one KV memory budget (``kv_budget_mb``), the concurrent ``kv_sequence_tokens``-token
sequences admitted, aggregate tok/s and single-stream decode with an int8, an int4 and a k8v4 (keys int8,
values int4) cache against the unquantized one (``bench.ours_kvcache``).
"""

KV_CACHE_DTYPES = ("auto", "int8", "int4", "k8v4")
"""The cache dtypes the ``kvcache`` measurement runs, one process each, unquantized first."""
KV_CACHE_ROUNDS = 2
"""Rounds of the ``kvcache`` measurement (each: one process per cache dtype; the report takes medians)."""
KV_NEW_TOKENS = 32
"""Tokens each ``kvcache`` sequence generates (its prompt fills the rest of ``kv_sequence_tokens``)."""

MEMORY_HEADROOM_BYTES = 600 * 10**6
"""Allowance on top of weights + KV pool in the memory budget (interpreter, torch, tokenizer, activations)."""


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name}: must be positive, got {value}")


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run's parameters.

    Invariants: every count is positive; ``only`` is a non-empty subset of ``MEASUREMENTS`` kept in
    ``MEASUREMENTS`` order; ``kv_cache_tokens`` is ``None`` (size the pool from the workload) or positive;
    ``compare_dequantized`` implies that ``throughput`` is measured (it adds a row to that measurement).

    ``skip_peer`` skips the HF transformers processes, ``skip_llamacpp`` the llama.cpp ones.
    """

    model: str | None = None
    requests: int = 32
    tokens: int = 128
    issue_requests: int = 8
    only: tuple[str, ...] = MEASUREMENTS
    json_path: str | None = None
    skip_peer: bool = False
    skip_llamacpp: bool = False
    compare_dequantized: bool = False
    threads: int | None = None
    kv_cache_tokens: int | None = None
    session_tokens: int = 1500
    session_turns: int = 5
    session_reply_tokens: int = 32
    bandwidth_mb: int = 512
    timeout_s: int = 3600
    check: bool = False
    kv_budget_mb: int = 96
    kv_sequences: int = 16
    kv_sequence_tokens: int = 1024

    def __post_init__(self) -> None:
        for name in ("requests", "tokens", "issue_requests", "session_tokens", "session_turns",
                     "session_reply_tokens", "bandwidth_mb", "timeout_s", "kv_budget_mb", "kv_sequences"):
            _positive(name, getattr(self, name))
        if self.threads is not None:
            _positive("threads", self.threads)
        if self.kv_cache_tokens is not None:
            _positive("kv_cache_tokens", self.kv_cache_tokens)
        if self.kv_sequence_tokens <= KV_NEW_TOKENS:
            raise ValueError(f"kv_sequence_tokens: must exceed the {KV_NEW_TOKENS} tokens each sequence "
                             f"generates, got {self.kv_sequence_tokens}")
        if self.session_turns < 2:
            raise ValueError(
                f"session_turns: needs at least 2 turns to reuse a session, got {self.session_turns}")
        unknown = [name for name in self.only if name not in MEASUREMENTS]
        if unknown or not self.only:
            raise ValueError(
                f"only: expected a non-empty subset of {list(MEASUREMENTS)}, got {list(self.only)}")
        object.__setattr__(self, "only", tuple(name for name in MEASUREMENTS if name in self.only))
        if self.compare_dequantized and not self.wants("throughput"):
            raise ValueError(
                "compare_dequantized: compares the throughput measurement, which --only leaves out "
                f"(got {list(self.only)})")

    def wants(self, measurement: str) -> bool:
        return measurement in self.only

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchSettings:
        return cls(
            model=args.model,
            requests=args.requests,
            tokens=args.tokens,
            issue_requests=args.issue_requests,
            only=tuple(args.only) if args.only else MEASUREMENTS,
            json_path=args.json,
            skip_peer=args.skip_peer,
            skip_llamacpp=args.skip_llamacpp,
            compare_dequantized=args.compare_dequantized,
            threads=args.threads,
            kv_cache_tokens=args.kv_cache_tokens,
            session_tokens=args.session_tokens,
            session_turns=args.session_turns,
            session_reply_tokens=args.session_reply_tokens,
            bandwidth_mb=args.bandwidth_mb,
            timeout_s=args.timeout,
            check=args.check,
            kv_budget_mb=args.kv_budget_mb,
            kv_sequences=args.kv_sequences,
            kv_sequence_tokens=args.kv_sequence_tokens,
        )


def parse_only(text: str) -> list[str]:
    """``--only`` value: comma-separated measurement names (argparse type function)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in MEASUREMENTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated names from {', '.join(MEASUREMENTS)}; got {text!r}")
    return names
