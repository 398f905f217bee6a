"""The benchmark harness: its arithmetic against independent references, and one tiny end-to-end run on the
real SmolLM2 GGUF whose table values must be the ones its measuring processes reported."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from asyncllm.bench import add_bench_command, harness, main, peers_llamacpp
from asyncllm.bench.harness import build_parser, plan
from asyncllm.bench.results import REPORT_ONLY, Row, Target
from asyncllm.bench.roofline import decode_flops_per_token, kv_bytes_per_token, parameter_bytes
from asyncllm.bench.settings import MEMORY_HEADROOM_BYTES, BenchSettings
from asyncllm.bench.workload import (
    SINGLE_STREAM_RUNS,
    chat_prompt_ids,
    llamacpp_round_key,
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
        "--bandwidth-mb", "64", "--skip-peer", "--skip-llamacpp", "--json", str(out), "--timeout", "300",
    ])
    assert status == 0
    record = json.loads(out.read_text())
    rows = {row["metric"]: row for row in record["rows"]}
    raw = {task: proc["result"] for task, proc in record["processes"].items()}
    assert set(raw) == {"ours_throughput", "ours_weights_dense", "ours_misc"} | {
        single_round_keys(index)[0] for index in range(1, SINGLE_STREAM_RUNS + 1)}

    batch = raw["ours_throughput"]
    assert batch["tokens_per_request"] == [8, 8] and batch["generated_tokens"] == 16
    throughput = rows["aggregate throughput 2x8"]
    assert throughput["asyncllm"] == pytest.approx(16 / batch["elapsed_s"])
    assert (throughput["peer"], throughput["ratio"], throughput["verdict"]) == (None, None, "n/a")

    # The default load keeps the Q4_1 weights packed; the dequantized load holds every tensor in float32.
    dense = raw["ours_weights_dense"]
    assert dense["dequantize_weights"] and dense["weight_bytes"] == _gguf_weight_bytes(smollm2_gguf)
    weights = rows["weight bytes, default (packed) vs dequantized load"]
    assert weights["asyncllm"] == pytest.approx(batch["weight_bytes"] / 1e6)
    assert weights["share"] == pytest.approx(batch["weight_bytes"] / dense["weight_bytes"])
    assert weights["verdict"] == ("pass" if weights["share"] <= 0.35 else "fail")
    # SmolLM2-135M: 30 layers x 3 KV heads x head_dim 64, K and V, float32.
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


def _settings(*argv: str) -> BenchSettings:
    return BenchSettings.from_args(build_parser().parse_args(list(argv)))


def test_single_stream_rounds_alternate_asyncllm_hf_and_llamacpp_processes() -> None:
    settings = _settings("--only", "single")
    expected = []
    for index in range(1, SINGLE_STREAM_RUNS + 1):
        ours_key, hf_key = single_round_keys(index)
        expected += [(ours_key, "ours_single", []), (hf_key, "hf", ["single"]),
                     (llamacpp_round_key(index), peers_llamacpp.TASK, [])]
    assert plan(settings, llamacpp=True) == expected
    assert plan(settings, llamacpp=False) == [task for task in expected if task[1] != peers_llamacpp.TASK]
    alone = _settings("--only", "single", "--skip-peer")
    assert plan(alone, llamacpp=False) == expected[::3]
    assert plan(alone, llamacpp=True) == [task for task in expected if task[1] != "hf"]
    with pytest.raises(ValueError, match=r"^round_index"):
        single_round_keys(0)
    with pytest.raises(ValueError, match=r"^round_index"):
        llamacpp_round_key(0)


def test_memory_plans_a_dense_load_and_compare_dequantized_a_dense_throughput_run() -> None:
    assert plan(_settings("--only", "memory"), llamacpp=False) == [
        ("ours_throughput", "ours_throughput", []), ("ours_weights_dense", "ours_weights_dense", [])]
    assert plan(_settings("--only", "throughput", "--skip-peer"), llamacpp=False) == [
        ("ours_throughput", "ours_throughput", [])]
    # the dense throughput process also supplies the dense weight bytes: no separate load
    assert plan(_settings("--only", "throughput,memory", "--compare-dequantized", "--skip-peer"), llamacpp=False) == [
        ("ours_throughput", "ours_throughput", []), ("ours_throughput_dense", "ours_throughput_dense", [])]


def test_every_planned_task_is_dispatched_by_the_child() -> None:
    child_source = Path(harness.__file__).with_name("child.py").read_text()
    settings = _settings("--compare-dequantized")
    tasks = {task for _, task, _ in plan(settings, llamacpp=True)} | {peers_llamacpp.TASK_NO_EXTRA_BUFFERS}
    tasks |= {task for _, task, _ in plan(_settings("--only", "memory"), llamacpp=False)}
    assert {"ours_throughput_dense", "ours_weights_dense", "llamacpp"} <= tasks
    for task in tasks:
        assert f'"{task}"' in child_source, task


def test_new_options_parse_and_compare_dequantized_needs_the_throughput_measurement() -> None:
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--skip-llamacpp", "--compare-dequantized"])
    assert (args.skip_llamacpp, args.compare_dequantized) == (True, True)
    settings = BenchSettings.from_args(args)
    assert settings.skip_llamacpp and settings.compare_dequantized
    assert not BenchSettings().skip_llamacpp and not BenchSettings().compare_dequantized
    with pytest.raises(ValueError, match=r"^compare_dequantized"):
        BenchSettings(only=("single",), compare_dequantized=True)
    assert main(["--only", "single,memory", "--compare-dequantized"]) == 2


def test_share_target_bounds_ours_over_peer() -> None:
    smaller = Row("5", "weights", "MB", 100.0, 500.0, False, Target("share_at_most", 0.35), "dense")
    assert smaller.share == pytest.approx(0.2) and smaller.ratio == pytest.approx(5.0)
    assert smaller.verdict == "pass" and smaller.target.describe("MB") == "<= 0.35x peer"
    assert Row("5", "w", "MB", 200.0, 500.0, False, Target("share_at_most", 0.35), "d").verdict == "fail"
    assert Row("5", "w", "MB", 100.0, None, False, Target("share_at_most", 0.35), "d").verdict == "n/a"
    assert Row("5", "w", "MB", 100.0, 0.0, False, Target("share_at_most", 0.35), "d").verdict == "n/a"
    with pytest.raises(ValueError, match=r"^kind"):
        Target("ratio_at_most")  # type: ignore[arg-type]


def test_llamacpp_skip_reason_names_the_missing_package_and_non_gguf_models(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now fails
    reason = peers_llamacpp.skip_reason(str(tmp_path / "m.gguf"))
    assert peers_llamacpp.skip_message(reason or "") == (
        "llama.cpp peer skipped: llama-cpp-python is not installed (pip install llama-cpp-python)")
    assert peers_llamacpp.skip_reason(str(tmp_path / "hf-dir")) == "the model is not a .gguf file"
    assert harness.llamacpp_skip(_settings("--only", "single", "--skip-llamacpp"), "m.gguf") == "--skip-llamacpp"
    assert harness.llamacpp_skip(_settings("--only", "cold"), "m.gguf") == "the single measurement is not selected"


class _FakeLlama:
    """Stands in for ``llama_cpp.Llama``: ``generate`` yields token ids forever, as the real one does."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.resets = 0
        self.closed = False
        self.calls: list[tuple[list[int], dict[str, Any]]] = []
        self.stop_after = stop_after

    def reset(self) -> None:
        self.resets += 1

    def generate(self, tokens: list[int], **kwargs: Any) -> Any:
        self.calls.append((tokens, kwargs))

        def tokens_forever() -> Any:
            try:
                count = 0
                while self.stop_after is None or count < self.stop_after:
                    count += 1
                    yield 2  # EOS: never ends the run
            finally:
                self.closed = True

        return tokens_forever()


def test_llamacpp_greedy_run_takes_exactly_the_asked_tokens_and_times_decode_like_ours() -> None:
    llama = _FakeLlama()
    result = peers_llamacpp.timed_decode(llama, [5, 6, 7], 6)
    assert llama.resets == 1 and llama.closed
    assert llama.calls == [([5, 6, 7], {"temp": 0.0, "repeat_penalty": 1.0, "reset": True})]
    assert (result["generated_tokens"], result["decode_tokens"], result["prompt_tokens"]) == (6, 5, 3)
    assert result["decode_s"] == pytest.approx(result["elapsed_s"] - result["ttft_s"])
    with pytest.raises(RuntimeError, match="generated 2 tokens, asked for 4"):
        peers_llamacpp.greedy_stamps(_FakeLlama(stop_after=2), [1], 4)
    assert peers_llamacpp.context_tokens([75, 60], 128) == 512
    assert peers_llamacpp.context_tokens([700], 128) == 1024


def _round(speed: float, **extra: Any) -> dict[str, Any]:
    single = {"decode_tokens_per_s": speed, "prompt_tokens": 75, "decode_tokens": 15, "ttft_s": 0.1,
              "elapsed_s": 0.5, "decode_s": 0.4, "generated_tokens": 16}
    return {"threads": 2, "weight_bytes": 100e6, "kv_bytes_per_token": 46080, "single": single, **extra}


def _ours_round(speed: float) -> dict[str, Any]:
    return _round(speed, bandwidth_samples_bytes_per_s=[30e9, 32e9], bandwidth_copy_bytes=2 * 2**20,
                  bandwidth_repeats=5, decode_flops_per_token_ctx0=2.7e8, decode_flops_per_context_token=69120.0)


def _llama_round(speed: float) -> dict[str, Any]:
    return _round(speed, extra_buffers=False, version="0.3.36", n_ctx=512, n_batch=512, threads_batch=2)


def _throughput(tok_s: float, weight_bytes: float, dtype: str) -> dict[str, Any]:
    return {"threads": 2, "tokens_per_s": tok_s, "ttft_mean_s": 0.5, "ttft_p50_s": 0.5, "elapsed_s": 4.0,
            "weight_bytes": weight_bytes, "tokens_per_request": [8, 8], "prompt_tokens": 150, "requests": 2,
            "generated_tokens": 16, "num_preemptions": 0, "dtype": dtype, "peak_rss_bytes": 900e6,
            "peak_rss_load_bytes": 800e6, "peak_rss_run_bytes": 900e6, "kv_pool_bytes": 190e6,
            "kv_pool_tokens": 4096, "decode_flops_per_token_ctx0": 2.7e8, "decode_flops_per_context_token": 69120.0}


def _ok(task: str, result: dict[str, Any]) -> Any:
    from asyncllm.bench.subproc import ChildOutcome

    return ChildOutcome(task, 1.0, result, None, 0)


def test_findings_report_llamacpp_dense_throughput_and_weight_bytes_rows() -> None:
    from asyncllm.bench.measurements import build_findings
    from asyncllm.bench.report import render_table, table_cells

    settings = _settings("--only", "throughput,single,memory", "--requests", "2", "--tokens", "16",
                         "--compare-dequantized", "--skip-peer")
    outcomes = {
        "ours_throughput": _ok("ours_throughput", _throughput(40.0, 100e6, "float32")),
        "ours_throughput_dense": _ok("ours_throughput_dense", _throughput(32.0, 500e6, "float32")),
    }
    for index, (ours, llama) in enumerate(((50.0, 40.0), (45.0, 50.0), (60.0, 30.0)), start=1):
        outcomes[single_round_keys(index)[0]] = _ok("ours_single", _ours_round(ours))
        outcomes[llamacpp_round_key(index)] = _ok("llamacpp_no_extra_bufts", _llama_round(llama))
    findings = build_findings(settings, outcomes)
    rows = {row.metric: row for row in findings.rows}

    dense_row = rows["aggregate throughput 2x16, packed vs dequantized"]
    assert (dense_row.ours, dense_row.peer, dense_row.verdict) == (40.0, 32.0, "-")
    assert dense_row.ratio == pytest.approx(1.25)
    llama_row = rows["single-stream decode 1x16, llama.cpp peer"]
    assert (llama_row.ours, llama_row.peer) == (50.0, 40.0)  # each side's median round
    assert llama_row.ratio == pytest.approx(1.25) and llama_row.verdict == "pass"
    hf_row = rows["single-stream decode 1x16"]
    assert (hf_row.peer, hf_row.verdict) == (None, "n/a")
    weights = rows["weight bytes, default (packed) vs dequantized load"]
    assert (weights.ours, weights.peer, weights.verdict) == (100.0, 500.0, "pass")
    assert weights.peer_label == "asyncllm dequantize_weights=True (float32)"

    cells = {line[1]: line for line in table_cells(findings.rows)}
    assert cells[llama_row.metric][2:7] == ("50.0 tok/s", "40.0 tok/s", "1.25x", ">= 1x", "pass")
    assert cells[weights.metric][2:7] == ("100 MB", "500 MB", "5.00x", "<= 0.35x peer", "pass")
    assert llama_row.metric in render_table(findings.rows)
    notes = "\n".join(findings.notes)
    assert "llama.cpp 40.0, 50.0, 30.0" in notes and "use_extra_bufts=False" in notes
    assert "every measuring process ran with 2 threads" in notes


def test_missing_llamacpp_is_announced_and_the_run_proceeds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from asyncllm.bench import machine
    from asyncllm.bench.workload import WorkloadSpec

    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    spec = WorkloadSpec(model=str(model), threads=2, kv_cache_tokens=1024, max_tokens=16, prompts=[[1, 2]],
                        issue_requests=1, warmup_prompt=[3], cold_prompt=[4], session_system="s",
                        session_messages=["a", "b"], session_reply_tokens=4, bandwidth_mb=8)
    monkeypatch.setattr(harness, "build_workload", lambda settings, model, threads: spec)
    monkeypatch.setattr(machine, "collect_machine", lambda threads: machine.MachineInfo(
        "cpu", 2, 2, threads, "t", "x", "3.11", "linux", "on"))
    planned: list[list[tuple[str, str, list[str]]]] = []

    def fake_run(settings: BenchSettings, spec: Any, *, llamacpp: bool) -> Any:
        planned.append(plan(settings, llamacpp=llamacpp))
        return {key: _ok(task, _ours_round(50.0)) for key, task, _ in planned[-1]}, []

    monkeypatch.setattr(harness, "run_processes", fake_run)
    assert main(["--model", str(model), "--only", "single", "--skip-peer", "--threads", "2", "--tokens", "16"]) == 0
    assert [task for _, task, _ in planned[0]] == ["ours_single"] * SINGLE_STREAM_RUNS
    captured = capsys.readouterr()
    message = "llama.cpp peer skipped: llama-cpp-python is not installed (pip install llama-cpp-python)"
    assert message in captured.err and message in captured.out
    llama_line = next(line for line in captured.out.splitlines() if "llama.cpp peer" in line and "|" in line)
    assert "50.0 tok/s" in llama_line and llama_line.count("n/a") == 3  # peer, ratio, verdict


def test_a_llamacpp_process_killed_by_sigill_reruns_without_extra_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from asyncllm.bench.subproc import ChildOutcome
    from asyncllm.bench.workload import WorkloadSpec

    spec = WorkloadSpec(model="m.gguf", threads=2, kv_cache_tokens=1024, max_tokens=16, prompts=[[1, 2]],
                        issue_requests=1, warmup_prompt=[3], cold_prompt=[4], session_system="s",
                        session_messages=["a", "b"], session_reply_tokens=4, bandwidth_mb=8)
    calls: list[str] = []

    def fake_child(task: str, job: dict[str, Any], *, timeout_s: float) -> ChildOutcome:
        calls.append(task)
        if task == peers_llamacpp.TASK:
            return ChildOutcome(task, 0.1, None, "exited with status -4 and no result", -signal.SIGILL)
        return ChildOutcome(task, 0.1, {"threads": 2}, None, 0)

    monkeypatch.setattr(harness, "run_child", fake_child)
    outcomes, notes = harness.run_processes(_settings("--only", "single", "--skip-peer"), spec, llamacpp=True)
    fallback = peers_llamacpp.TASK_NO_EXTRA_BUFFERS
    assert calls == ["ours_single", peers_llamacpp.TASK, fallback] + ["ours_single", fallback] * 2
    assert all(outcome.ok for outcome in outcomes.values())
    assert outcomes[llamacpp_round_key(1)].task == fallback
    assert len(notes) == 1 and "SIGILL" in notes[0]


def test_contention_runs_one_process_and_reports_the_fraction_of_the_quiet_speeds() -> None:
    from asyncllm.bench.measurements import Findings, contention_findings
    from asyncllm.bench.subproc import ChildOutcome

    settings = _settings("--only", "contention", "--tokens", "16")
    assert plan(settings, llamacpp=True) == [("ours_contention", "ours_contention", [])]
    result = {"threads": 2, "competitors": 2, "openmp_env": {"GOMP_SPINCOUNT": "20000"},
              "quiet": {"decode_tokens_per_s": 60.0}, "contended": {"decode_tokens_per_s": 24.0},
              "quiet_one_thread": {"decode_tokens_per_s": 40.0}}
    outcome = ChildOutcome(task="ours_contention", wall_s=1.0, result=result, error=None, returncode=0)
    findings = Findings()
    contention_findings(settings, {"ours_contention": outcome}, findings)
    fraction, versus_one = findings.rows
    assert (fraction.ours, fraction.peer, fraction.ratio) == (24.0, 60.0, pytest.approx(0.4))
    assert (versus_one.ratio, versus_one.verdict) == (pytest.approx(0.6), "pass")
    assert "GOMP_SPINCOUNT=20000" in findings.notes[0] and "2 Python processes" in findings.notes[0]
