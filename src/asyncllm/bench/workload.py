"""The benchmark's inputs: distinct chat prompts, a long multi-turn conversation, and the job handed to
each measuring subprocess.

Every prompt is tokenized once, in the parent, with the model's own chat template, so asyncllm and the
peer receive the same token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

_TOPICS: tuple[str, ...] = (
    "the water cycle", "how vaccines train the immune system", "the causes of the French Revolution",
    "photosynthesis", "how a bill becomes law", "compound interest", "plate tectonics",
    "the difference between weather and climate", "how a CPU cache works", "the life cycle of a star",
    "why the sky is blue", "supply and demand", "how bees communicate", "the Roman road network",
    "how noise-cancelling headphones work", "the basics of sourdough baking",
)
_ASKS: tuple[str, ...] = (
    "Can you explain {topic} to a curious twelve-year-old?",
    "Write a short study guide about {topic}.",
    "What are the three most common misconceptions about {topic}?",
    "Give me a step-by-step overview of {topic}.",
    "Summarise {topic} for a busy manager in plain language.",
    "Create five quiz questions, with answers, about {topic}.",
    "Compare {topic} with something from everyday life.",
    "What should a beginner read first to understand {topic}?",
)
_CONTEXT: tuple[str, ...] = (
    "I am preparing a lesson for next week and want something accurate but friendly.",
    "My notes from class are messy, so please keep the structure clear.",
    "I have about ten minutes to read this before a meeting.",
    "Please avoid jargon unless you define it right away.",
    "A short example would help me remember the main idea.",
    "I already know the basics, so focus on what people usually get wrong.",
)
_SESSION_SENTENCES: tuple[str, ...] = (
    "We are migrating our order service from a single PostgreSQL instance to a sharded setup.",
    "Today the service handles about two thousand writes per second at peak, mostly from checkout.",
    "Reads are dominated by the order history page, which joins orders, items and shipments.",
    "Our team is five engineers, and two of them have operated sharded databases before.",
    "We cannot take more than five minutes of downtime during the switch, ideally none.",
    "The current schema uses a global sequence for order ids, which other services rely on.",
    "Customers are spread over three regions, and most traffic stays within one region.",
    "Finance runs nightly reports that scan every order from the previous day.",
    "We already publish change events to a message queue for the analytics pipeline.",
    "Some legacy jobs still write directly to the orders table without going through the service.",
    "The largest customers have hundreds of thousands of orders, so shard keys by customer could be uneven.",
    "Our monitoring covers latency percentiles and error rates but not replication lag yet.",
    "Backups are taken every hour and restores have been tested twice this year.",
    "The product team wants to add multi-currency support in the same quarter.",
    "We are worried about cross-shard queries for support agents who search by email address.",
    "A previous attempt stalled because the dual-write phase produced inconsistent rows.",
)
SESSION_SYSTEM = "You are a senior database engineer. Answer concisely and concretely."
WARMUP_NEW_TOKENS = 8
"""Tokens each warm-up request generates before timing starts (both libraries)."""
SINGLE_STREAM_RUNS = 3
"""Rounds of the single-stream measurement: each round is one asyncllm process, one HF process and one
llama.cpp process, back to back, with one timed run each; on each side the run of median decode speed
counts."""


def single_round_keys(round_index: int) -> tuple[str, str]:
    """Outcome keys of single-stream round ``round_index`` (from 1): asyncllm's process, then HF's."""
    if round_index < 1:
        raise ValueError(f"round_index: must be >= 1, got {round_index}")
    return f"ours_single_{round_index}", f"hf_single_{round_index}"


def llamacpp_round_key(round_index: int) -> str:
    """Outcome key of the llama.cpp process of single-stream round ``round_index`` (from 1)."""
    if round_index < 1:
        raise ValueError(f"round_index: must be >= 1, got {round_index}")
    return f"llamacpp_single_{round_index}"


def stamped_timing(start: float, stamps: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """Timing of one streamed request from ``(time, tokens)`` stamps of its outputs (both libraries).

    ``decode_tokens_per_s`` excludes the first output (prefill + first token): it is the tokens after the
    first divided by the time between the first and the last output.
    """
    if not stamps:
        raise ValueError("stamps: the request produced no tokens")
    decode_tokens = sum(n for _, n in stamps) - stamps[0][1]
    decode_s = stamps[-1][0] - stamps[0][0]
    return {
        "ttft_s": stamps[0][0] - start,
        "elapsed_s": stamps[-1][0] - start,
        "decode_tokens": decode_tokens,
        "decode_s": decode_s,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None,
    }


def median_decode_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run whose ``decode_tokens_per_s`` is the median of ``runs`` (an odd count: a real run), with
    every run's speed attached as ``runs_decode_tokens_per_s`` so that the spread stays visible."""
    if not runs:
        raise ValueError("runs: need at least one timed run")
    ordered = sorted(runs, key=lambda run: run["decode_tokens_per_s"] or 0.0)
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["runs_decode_tokens_per_s"] = [run["decode_tokens_per_s"] for run in runs]
    return chosen


class TokenizerLike(Protocol):
    """The part of ``asyncllm.tokenizer.Tokenizer`` the workload needs."""

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]: ...


def chat_prompt_text(index: int) -> str:
    """User message ``index`` (``>= 0``): distinct for every index, a few sentences long."""
    if index < 0:
        raise ValueError(f"index: must be >= 0, got {index}")
    topic = _TOPICS[index % len(_TOPICS)]
    ask = _ASKS[(index // len(_TOPICS)) % len(_ASKS)].format(topic=topic)
    first = _CONTEXT[index % len(_CONTEXT)]
    second = _CONTEXT[(index + 3) % len(_CONTEXT)]
    return f"{ask} {first} {second} (Request {index + 1}.)"


def chat_prompt_ids(tokenizer: TokenizerLike, count: int) -> list[list[int]]:
    """``count`` distinct prompts, each one user message rendered with the chat template."""
    if count <= 0:
        raise ValueError(f"count: must be positive, got {count}")
    return [tokenizer.apply_chat_template([{"role": "user", "content": chat_prompt_text(i)}])
            for i in range(count)]


def session_user_messages(
    tokenizer: TokenizerLike, *, turns: int, total_tokens: int, reply_tokens: int
) -> list[str]:
    """``turns`` user messages: the first ``turns - 1`` are long, sized so that with replies of about
    ``reply_tokens`` tokens the history before the last turn reaches about ``total_tokens`` tokens; the last
    is a short follow-up question, as in a real chat (its prompt adds a few dozen new tokens)."""
    if turns <= 1 or total_tokens <= 0 or reply_tokens <= 0:
        raise ValueError("turns (at least 2), total_tokens, reply_tokens: must be positive")
    overhead = len(tokenizer.apply_chat_template([{"role": "system", "content": SESSION_SYSTEM}]))
    history_turns = turns - 1
    per_turn = max(8, (total_tokens - overhead) // history_turns - reply_tokens - 6)
    messages: list[str] = []
    cursor = 0
    for turn in range(history_turns):
        parts = [f"Part {turn + 1} of my question."]
        while len(tokenizer.encode(" ".join(parts), add_special_tokens=False)) < per_turn:
            parts.append(_SESSION_SENTENCES[cursor % len(_SESSION_SENTENCES)])
            cursor += 1
        parts.append("What would you do next?")
        messages.append(" ".join(parts))
    messages.append(FOLLOW_UP_QUESTION)
    return messages


FOLLOW_UP_QUESTION = "Thanks. Looking back at everything above, which single step matters most, and why?"


_WARMUP_TEXT = (
    "The quick brown fox jumps over the lazy dog while a small band plays in the park, and the "
    "neighbours argue cheerfully about whether it will rain before the evening train arrives."
)


def warmup_ids(tokenizer: TokenizerLike, length: int) -> list[int]:
    """Plain text (no chat template, so no prefix shared with the timed prompts) of ``length`` tokens."""
    if length <= 0:
        raise ValueError(f"length: must be positive, got {length}")
    unit = tokenizer.encode(_WARMUP_TEXT, add_special_tokens=False)
    return (unit * (length // len(unit) + 1))[:length]


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything a measuring subprocess needs; JSON round-trips through ``to_json``/``from_json``.

    ``prompts`` are token ids (chat template applied); ``warmup_prompt`` shares no prefix with them, so
    warming up never pre-fills a prefix cache the timed run could reuse.
    """

    model: str
    threads: int
    kv_cache_tokens: int
    max_tokens: int
    prompts: list[list[int]]
    issue_requests: int
    warmup_prompt: list[int]
    cold_prompt: list[int]
    session_system: str
    session_messages: list[str]
    session_reply_tokens: int
    bandwidth_mb: int
    jobs: list[str] = field(default_factory=list)
    kv_budget_bytes: int = 96 * 10**6
    kv_sequences: int = 16
    kv_sequence_tokens: int = 1024
    kv_new_tokens: int = 32

    def with_jobs(self, jobs: Sequence[str]) -> WorkloadSpec:
        return WorkloadSpec(**{**asdict(self), "jobs": list(jobs)})


def kv_tokens_for(prompts: Sequence[Sequence[int]], max_tokens: int, *, session_tokens: int,
                  session_reply_tokens: int, block_size: int = 16) -> int:
    """A KV pool (in tokens) that holds every throughput request at full length at once, and the session
    transcript twice over, rounded up to a multiple of 1024."""
    batch = sum(len(p) + max_tokens + block_size for p in prompts)
    session = 2 * (session_tokens + 4 * session_reply_tokens) + 512
    need = max(batch, session, 2048)
    return -(-need // 1024) * 1024
