"""The benchmark harness: its arithmetic against independent references, and one tiny end-to-end run on the
real SmolLM2 GGUF whose table values must be the ones its measuring processes reported."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from asyncllm.bench import add_bench_command, main
from asyncllm.bench.harness import build_parser, plan
from asyncllm.bench.results import REPORT_ONLY, Row, Target
from asyncllm.bench.roofline import decode_flops_per_token, kv_bytes_per_token, parameter_bytes
from asyncllm.bench.settings import MEMORY_HEADROOM_BYTES, BenchSettings
from asyncllm.bench.workload import (
    SINGLE_STREAM_RUNS,
    chat_prompt_ids,
    median_decode_run,
    session_user_messages,
    single_round_keys,
    stamped_timing,
    warmup_ids,
)
from asyncllm.config import ModelConfig


def _row(ours: float | None, peer: float | None, higher: bool, target: Target) -> Row:
    return Row("0", "m", "s", ours, peer, higher, target, "peer")


def test_ratio_reads_times_better_and_verdict_applies_the_target() -> None:
    faster = _row(12.0, 2.0, True, Target("ratio_at_least", 5.0))
    assert faster.ratio == pytest.approx(6.0) and faster.verdict == "pass"
    slower_ttft = _row(0.5, 4.0, False, Target("ratio_at_least", 10.0))
    assert slower_ttft.ratio == pytest.approx(8.0) and slower_ttft.verdict == "fail"
    roofline = _row(0.55, None, True, Target("ours_at_least", 0.6))
    assert roofline.ratio is None and roofline.verdict == "fail"
    assert _row(3.0, None, True, Target("ratio_at_least", 2.0)).verdict == "n/a"
    assert _row(3.0, 1.0, True, REPORT_ONLY).verdict == "-"
    assert _row(3.0, 0.0, True, Target("ratio_at_least", 2.0)).ratio is None


def test_settings_reject_bad_values_by_name() -> None:
    with pytest.raises(ValueError, match=r"^requests"):
        BenchSettings(requests=0)
    with pytest.raises(ValueError, match=r"^only"):
        BenchSettings(only=("throughput", "bogus"))
    assert BenchSettings(only=("memory", "cold")).only == ("cold", "memory")
    assert main(["--requests", "0"]) == 2


def test_bench_command_registers_on_subparsers() -> None:
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--only", "single,cold", "--skip-peer", "--tokens", "4"])
    assert (args.command, args.only, args.skip_peer, args.tokens) == ("bench", ["single", "cold"], True, 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--only", "nonsense"])


def test_stamped_timing_excludes_the_first_output_from_decode_speed() -> None:
    timing = stamped_timing(10.0, [(10.5, 1), (11.0, 2), (12.5, 3)])
    assert timing == {
        "ttft_s": 0.5, "elapsed_s": 2.5, "decode_tokens": 5, "decode_s": 2.0, "decode_tokens_per_s": 2.5,
    }
    assert stamped_timing(0.0, [(1.0, 4)])["decode_tokens_per_s"] is None  # one output: no decode interval
    with pytest.raises(ValueError, match=r"^stamps"):
        stamped_timing(0.0, [])


def test_median_decode_run_is_a_real_run_and_keeps_the_spread() -> None:
    runs = [{"decode_tokens_per_s": speed, "id": i} for i, speed in enumerate((30.0, 10.0, 20.0))]
    chosen = median_decode_run(runs)
    assert chosen["id"] == 2 and chosen["runs_decode_tokens_per_s"] == [30.0, 10.0, 20.0]
    assert "runs_decode_tokens_per_s" not in runs[2]
    with pytest.raises(ValueError, match=r"^runs"):
        median_decode_run([])


def test_parameter_bytes_count_tied_weights_once() -> None:
    embed = nn.Embedding(50, 8)
    head = nn.Linear(8, 50, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head, "proj": nn.Linear(8, 8)})
    assert parameter_bytes(model) == (50 * 8 + 8 * 8 + 8) * 4
    arena = torch.zeros(1024)  # parameters as views of one larger, shared storage: only their own bytes count
    for param, start in ((embed.weight, 0), (model["proj"].weight, 512), (model["proj"].bias, 600)):
        param.data = arena[start : start + param.numel()].view_as(param)
    assert parameter_bytes(model) == (50 * 8 + 8 * 8 + 8) * 4


def test_decode_flops_match_torch_flop_counter_on_hf_llama() -> None:
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                            attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        past = model(torch.randint(0, 300, (1, 10)), use_cache=True).past_key_values
        with FlopCounterMode(display=False) as counter:
            model(torch.tensor([[5]]), past_key_values=past, use_cache=True)
    config = ModelConfig.from_hf_config({**hf_config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    assert decode_flops_per_token(config, 11) == counter.get_total_flops()
    assert kv_bytes_per_token(config, torch.float32) == 2 * 2 * 2 * 16 * 4


@pytest.fixture(params=["in-memory", pytest.param("smollm2", marks=pytest.mark.slow)])
def chatml_tokenizer(request: pytest.FixtureRequest) -> Any:
    """A ChatML tokenizer: the in-memory test one, and the SmolLM2 GGUF's (skips when it is absent)."""
    return request.getfixturevalue("chat_tokenizer" if request.param == "in-memory" else "smollm2_tokenizer")


def test_workload_prompts_are_distinct_chat_prompts(chatml_tokenizer: Any) -> None:
    tokenizer = chatml_tokenizer
    prompts = chat_prompt_ids(tokenizer, 40)
    assert len({tuple(p) for p in prompts}) == 40
    rendered = tokenizer.decode(prompts[0], skip_special_tokens=False)
    assert rendered.startswith("<|im_start|>") and rendered.endswith("<|im_start|>assistant\n")
    warm = warmup_ids(tokenizer, 50)
    assert len(warm) == 50 and warm[0] != prompts[0][0]
    messages = session_user_messages(tokenizer, turns=5, total_tokens=1500, reply_tokens=32)
    lengths = [len(tokenizer.encode(m, add_special_tokens=False)) for m in messages]
    # four long turns carry the ~1,500-token history; the last turn is a short follow-up
    assert len(set(messages)) == 5 and all(250 <= n <= 400 for n in lengths[:4])
    assert lengths[4] * 6 < min(lengths[:4])


def _gguf_weight_bytes(path: Path) -> int:
    import gguf

    return sum(int(tensor.n_elements) for tensor in gguf.GGUFReader(str(path)).tensors) * 4


@pytest.mark.slow
def test_tiny_end_to_end_run_reports_measured_values(
    smollm2_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    status = main([
        "--model", str(smollm2_gguf), "--only", "throughput,memory,session,single", "--requests", "2",
        "--tokens", "8", "--session-tokens", "200", "--session-turns", "2", "--session-reply-tokens", "4",
        "--bandwidth-mb", "64", "--skip-peer", "--json", str(out), "--timeout", "300",
    ])
    assert status == 0
    record = json.loads(out.read_text())
    rows = {row["metric"]: row for row in record["rows"]}
    raw = {task: proc["result"] for task, proc in record["processes"].items()}
    assert set(raw) == {"ours_throughput", "ours_misc"} | {
        single_round_keys(index)[0] for index in range(1, SINGLE_STREAM_RUNS + 1)}

    batch = raw["ours_throughput"]
    assert batch["tokens_per_request"] == [8, 8] and batch["generated_tokens"] == 16
    throughput = rows["aggregate throughput 2x8"]
    assert throughput["asyncllm"] == pytest.approx(16 / batch["elapsed_s"])
    assert (throughput["peer"], throughput["ratio"], throughput["verdict"]) == (None, None, "n/a")

    # SmolLM2-135M: 30 layers x 3 KV heads x head_dim 64, K and V, float32.
    assert batch["weight_bytes"] == _gguf_weight_bytes(smollm2_gguf)
    assert batch["kv_pool_bytes"] == batch["kv_pool_tokens"] * 2 * 30 * 3 * 64 * 4
    memory = rows["peak RSS of the 2x8 process"]
    budget = batch["weight_bytes"] + batch["kv_pool_bytes"] + MEMORY_HEADROOM_BYTES
    assert memory["peer"] == pytest.approx(budget / 1e6)
    assert memory["asyncllm"] == pytest.approx(batch["peak_rss_bytes"] / 1e6)
    assert memory["ratio"] == pytest.approx(budget / batch["peak_rss_bytes"])
    assert memory["verdict"] == ("pass" if budget >= batch["peak_rss_bytes"] else "fail")

    session, stateless = raw["ours_misc"]["session"]["session"], raw["ours_misc"]["session"]["stateless"]
    assert session["prompt_tokens"] == stateless["prompt_tokens"]
    assert session["cached_tokens"] > 0 and stateless["cached_tokens"] == 0
    reuse = next(row for row in record["rows"] if row["measurement"] == "3")
    assert reuse["ratio"] == pytest.approx(stateless["ttft_s"] / session["ttft_s"])
    assert reuse["verdict"] == ("pass" if reuse["ratio"] >= 10 else "fail")

    rounds = [raw[single_round_keys(index)[0]] for index in range(1, SINGLE_STREAM_RUNS + 1)]
    speeds = [result["single"]["decode_tokens_per_s"] for result in rounds]
    median_run = next(result["single"] for result in rounds
                      if result["single"]["decode_tokens_per_s"] == sorted(speeds)[1])
    assert rows["single-stream decode 1x8"]["asyncllm"] == pytest.approx(sorted(speeds)[1])
    bandwidths = [sample for result in rounds for sample in result["bandwidth_samples_bytes_per_s"]]
    assert len(bandwidths) == 2 * SINGLE_STREAM_RUNS  # before and after each round's timed run
    context = median_run["prompt_tokens"] + 1 + median_run["decode_tokens"] / 2
    per_step = rounds[0]["weight_bytes"] + rounds[0]["kv_bytes_per_token"] * context
    fraction = per_step * sorted(speeds)[1] / sorted(bandwidths)[(len(bandwidths) - 1) // 2]
    assert rows["decode bandwidth / roofline"]["asyncllm"] == pytest.approx(fraction)

    printed = capsys.readouterr().out
    assert "aggregate throughput 2x8" in printed and f"{16 / batch['elapsed_s']:.1f} tok/s" in printed
    assert record["machine"]["torch_threads"] == batch["threads"] == raw["ours_misc"]["threads"] == rounds[0]["threads"]


def test_single_stream_rounds_alternate_asyncllm_and_hf_processes() -> None:
    settings = BenchSettings.from_args(build_parser().parse_args(["--only", "single"]))
    expected = []
    for index in range(1, SINGLE_STREAM_RUNS + 1):
        ours_key, hf_key = single_round_keys(index)
        expected += [(ours_key, "ours_single", []), (hf_key, "hf", ["single"])]
    assert plan(settings) == expected
    alone = BenchSettings.from_args(build_parser().parse_args(["--only", "single", "--skip-peer"]))
    assert plan(alone) == expected[::2]
    with pytest.raises(ValueError, match=r"^round_index"):
        single_round_keys(0)
