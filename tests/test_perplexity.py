"""``asyncllm.perplexity`` and ``asyncllm eval perplexity`` against Hugging Face transformers' documented
sliding-window loop ("Perplexity of fixed-length models"), computed here on the same token ids: a tiny
random Llama saved with ``save_pretrained`` (overlapping windows, a partial last one) and the real SmolLM2
GGUF (``slow``), packed and dequantized.

HF's documented loop weights each window's ``outputs.loss`` by ``num_valid_tokens - batch_size``; that
undercounts a window whose first target follows context by one, so the reference here weights each loss by
the number of targets it actually averaged (labels other than -100 after the one-position shift), which
makes it the token-weighted perplexity of the whole text."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncllm.corpus import stdlib_text
from asyncllm.eval_cli import format_result
from asyncllm.perplexity import Window, perplexity, perplexity_of_model, plan_windows

SEQLEN, STRIDE = 64, 24
"""The tiny model's windows: overlapping (stride < seqlen), several of them."""


def hf_perplexity(model: Any, ids: list[int], seqlen: int, stride: int) -> tuple[float, int]:
    """(perplexity, scored tokens) by HF's documented loop, float32, one window per forward."""
    input_ids = torch.tensor([ids])
    n = input_ids.shape[1]
    nll_sum, scored, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + seqlen, n)
        trg_len = end - prev_end
        window = input_ids[:, begin:end]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        valid = int((labels[:, 1:] != -100).sum())  # the targets outputs.loss averages over
        if valid:
            with torch.inference_mode():
                loss = model(window, labels=labels).loss
            nll_sum += float(loss) * valid
            scored += valid
        prev_end = end
        if end == n:
            break
    return math.exp(nll_sum / scored), scored


# ---------------------------------------------------------------- the window planner


def test_windows_by_hand() -> None:
    assert plan_windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    # stride == seqlen: no overlap, so each window's first token has no context and is not scored
    assert plan_windows(10, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    # ... and a one-token last window scores nothing, so it is not run
    assert plan_windows(9, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5)]
    assert plan_windows(3, 512, 256) == [Window(0, 3, 1)]
    assert plan_windows(2, 2, 1) == [Window(0, 2, 1)]
    assert plan_windows(10, 4, None) == plan_windows(10, 4, 2)  # half of seqlen by default


CASES = [(n, seqlen, stride) for n, seqlen in itertools.product((2, 3, 7, 16, 17, 100, 513), (2, 3, 5, 16, 64))
         for stride in sorted({1, 2, seqlen // 2 or 1, seqlen - 1 or 1, seqlen})]


@pytest.mark.parametrize(("n", "seqlen", "stride"), CASES)
def test_every_token_but_the_first_is_scored_once(n: int, seqlen: int, stride: int) -> None:
    windows = plan_windows(n, seqlen, stride)
    scored = [i for w in windows for i in range(w.first_target, w.end)]
    assert len(scored) == len(set(scored)), "a token scored twice"
    for w in windows:
        assert 0 <= w.begin < w.first_target < w.end <= n and w.length <= seqlen
    assert windows[-1].end == n or (stride == seqlen and n - windows[-1].end == 1)
    if stride < seqlen:
        assert sorted(scored) == list(range(1, n)) and sum(w.targets for w in windows) == n - 1
    else:  # no overlap: every window's first token is context-free
        assert sorted(scored) == [i for i in range(1, n) if i % seqlen]
    # HF's rule: window k starts at k * stride and targets the tokens past the previous window's end
    for k, w in enumerate(windows):
        assert w.begin == k * stride and w.end == min(w.begin + seqlen, n)
        assert w.first_target == max(w.begin + 1, windows[k - 1].end if k else 0)


@pytest.mark.parametrize(("args", "field"), [
    ((10, 1, 1), "seqlen"), ((10, 4, 0), "stride"), ((10, 4, 5), "stride"), ((1, 4, 2), "text"),
    ((0, 4, 2), "text"),
])
def test_planner_rejects_bad_arguments_by_name(args: tuple[int, int, int], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        plan_windows(*args)


# ---------------------------------------------------------------- a tiny random Llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, chat_tokenizer: Any) -> Path:
    """A random Llama saved by ``save_pretrained`` with the tests' byte-level tokenizer; 256 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=chat_tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.05,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    chat_tokenizer.backend.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **chat_tokenizer.special_tokens}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def text() -> str:
    return stdlib_text("heldout")[:1000]


@pytest.fixture(scope="module")
def text_ids(tiny_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    from asyncllm.tokenizer import Tokenizer

    ids = AutoTokenizer.from_pretrained(tiny_dir)(text).input_ids  # HF's default special tokens
    assert Tokenizer.from_path(tiny_dir).encode(text) == ids
    windows = plan_windows(len(ids), SEQLEN, STRIDE)
    assert len(windows) > 5 and windows[-1].length < SEQLEN, "expected overlapping windows, the last partial"
    return ids


@pytest.fixture(scope="module")
def hf_reference(tiny_dir: Path, text_ids: list[int]) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return hf_perplexity(model, text_ids, SEQLEN, STRIDE)


@pytest.mark.parametrize(("kernel_backend", "batch_size"), [("auto", 3), ("auto", 1), ("torch", 8)])
def test_tiny_llama_matches_hf(tiny_dir: Path, text: str, text_ids: list[int], hf_reference: tuple[float, int],
                               kernel_backend: str, batch_size: int) -> None:
    expected, scored = hf_reference
    result = perplexity(tiny_dir, text, seqlen=SEQLEN, stride=STRIDE, batch_size=batch_size, device="cpu",
                        kernel_backend=kernel_backend)  # type: ignore[arg-type]
    assert result.perplexity == pytest.approx(expected, rel=1e-3)
    assert result.nll == pytest.approx(math.log(expected), abs=1e-3)
    assert result.tokens == scored == len(text_ids) - 1 and result.text_tokens == len(text_ids)
    assert result.windows == len(plan_windows(len(text_ids), SEQLEN, STRIDE))
    assert (result.seqlen, result.stride, result.batch_size, result.model) == (SEQLEN, STRIDE, batch_size,
                                                                               str(tiny_dir))
    assert result.seconds > 0 and result.load_seconds > 0


def test_a_model_in_memory_on_text_or_ids(tiny_dir: Path, text: str, text_ids: list[int],
                                          hf_reference: tuple[float, int]) -> None:
    from asyncllm.builder import load_model
    from asyncllm.config import EngineConfig

    model, tokenizer = load_model(tiny_dir, EngineConfig(device="cpu"))
    on_text = perplexity_of_model(model, tokenizer, text, seqlen=SEQLEN, stride=STRIDE)
    on_ids = perplexity_of_model(model, None, torch.tensor(text_ids), seqlen=SEQLEN, stride=STRIDE, batch_size=5)
    assert on_text.perplexity == pytest.approx(hf_reference[0], rel=1e-3)
    assert on_ids.perplexity == pytest.approx(on_text.perplexity, rel=1e-6)
    assert on_ids.tokens == on_text.tokens == len(text_ids) - 1 and on_ids.load_seconds == 0
    # non-overlapping windows: HF's loop leaves every window's first token unscored, and so do we
    expected, scored = hf_reference_for(tiny_dir, text_ids, SEQLEN, SEQLEN)
    disjoint = perplexity_of_model(model, tokenizer, text_ids, seqlen=SEQLEN, stride=SEQLEN)
    assert disjoint.perplexity == pytest.approx(expected, rel=1e-3) and disjoint.tokens == scored


def hf_reference_for(directory: Path, ids: list[int], seqlen: int, stride: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    return hf_perplexity(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval(), ids,
                         seqlen, stride)


def test_random_ids_match_hf_with_long_windows(tiny_dir: Path) -> None:
    """Windows of the model's full 256 positions, stride 1 short of them, over random ids."""
    rng = random.Random(1)
    from asyncllm.builder import load_model
    from asyncllm.config import EngineConfig

    model, _ = load_model(tiny_dir, EngineConfig(device="cpu"))
    ids = [rng.randrange(model.config.vocab_size) for _ in range(700)]
    expected, scored = hf_reference_for(tiny_dir, ids, 256, 255)
    result = perplexity_of_model(model, None, ids, seqlen=256, stride=255, batch_size=2)
    assert result.perplexity == pytest.approx(expected, rel=1e-3) and result.tokens == scored == 699


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"seqlen": 1}, "seqlen"), ({"stride": 0}, "stride"), ({"seqlen": 16, "stride": 17}, "stride"),
    ({"batch_size": 0}, "batch_size"), ({"seqlen": 257}, "seqlen"), ({"text": ""}, "text"),
    ({"text": "a"}, "text"),
])
def test_bad_arguments_raise_value_error_naming_the_field(tiny_dir: Path, chat_tokenizer: Any,
                                                         kwargs: dict[str, Any], field: str) -> None:
    from asyncllm.builder import load_model
    from asyncllm.config import EngineConfig

    model, tokenizer = load_model(tiny_dir, EngineConfig(device="cpu"))
    text = kwargs.pop("text", "some text to score")
    with pytest.raises(ValueError, match=rf"^{field}:"):
        perplexity_of_model(model, tokenizer, text, **{"seqlen": 16, "stride": 8, **kwargs})


def test_window_arguments_are_checked_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^stride:"):
        perplexity(tmp_path / "missing", "text", seqlen=8, stride=9)


# ---------------------------------------------------------------- the command line


def _eval(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from asyncllm.cli import main

    code = main(["eval", "perplexity", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_matches_the_api(tiny_dir: Path, text: str, hf_reference: tuple[float, int], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "text.txt"
    file.write_text(text, encoding="utf-8")
    code, out, err = _eval(capsys, str(tiny_dir), "--text", str(file), "--seqlen", str(SEQLEN),
                           "--stride", str(STRIDE), "--batch-size", "4", "--device", "cpu", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["perplexity"] == pytest.approx(hf_reference[0], rel=1e-3)
    assert record["tokens"] == hf_reference[1] and record["text"] == str(file)
    assert {"nll", "windows", "seconds", "seqlen", "stride", "model"} <= set(record)
    assert (record["seqlen"], record["stride"], record["batch_size"]) == (SEQLEN, STRIDE, 4)

    jsonl = tmp_path / "text.jsonl"
    jsonl.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    code, out, err = _eval(capsys, str(tiny_dir), "--text", str(jsonl), "--seqlen", str(SEQLEN),
                           "--stride", str(STRIDE), "--device", "cpu")
    assert code == 0, err
    assert out.startswith(f"perplexity {record['perplexity']:.4f} ") and f"{record['tokens']} scored tokens" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--seqlen", "1"], "seqlen:"),
    (["--seqlen", "8", "--stride", "9"], "stride:"),
    (["--batch-size", "0"], "batch_size:"),
    (["--seqlen", "4096"], "seqlen: 4096 exceeds the model's 256 positions"),
    (["--text", "{missing}"], "--text: text file not found"),
    (["--text", "{empty}", "--seqlen", "16"], "text: needs at least 2 tokens"),
])
def test_cli_errors_exit_2_without_a_traceback(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               argv: list[str], message: str) -> None:
    (tmp_path / "empty.txt").write_text("")
    argv = [a.format(missing=tmp_path / "missing.txt", empty=tmp_path / "empty.txt") for a in argv]
    code, out, err = _eval(capsys, str(tiny_dir), "--device", "cpu", *argv)
    assert code == 2 and out == ""
    assert f"asyncllm eval: error: {message}" in err and "Traceback" not in err


def test_cli_missing_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _eval(capsys, str(tmp_path / "missing.gguf"), "--device", "cpu")
    assert code == 2 and "asyncllm eval: error:" in err and "missing.gguf" in err and "Traceback" not in err


def test_cli_parses_default_model_and_engine_options() -> None:
    from asyncllm.cli import build_parser

    args = build_parser().parse_args(["eval", "perplexity", "default", "--kernel-backend", "torch",
                                      "--dequantize-weights", "--dtype", "float32", "--kv-cache-dtype", "k8v4"])
    assert (args.command, args.eval_command, args.model) == ("eval", "perplexity", "default")
    assert (args.seqlen, args.stride, args.kernel_backend, args.dequantize_weights) == (512, None, "torch", True)
    assert args.kv_cache_dtype == "k8v4"


def test_human_line_names_the_numbers(tiny_dir: Path, text: str) -> None:
    result = perplexity(tiny_dir, text, seqlen=SEQLEN, stride=STRIDE, device="cpu", text_name="a slice")
    line = format_result(result)
    assert f"perplexity {result.perplexity:.4f}" in line and f"{result.tokens} scored tokens" in line
    assert f"{result.windows} windows" in line and "a slice" in line and "\n" not in line


# ---------------------------------------------------------------- the real SmolLM2 GGUF

SMOL_TOKENS, SMOL_SEQLEN, SMOL_STRIDE = 400, 192, 96
"""A short slice of the held-out text: four windows, the last partial (the HF reference is slow on 2 cores)."""


@pytest.fixture(scope="module")
def smollm2_slice(smollm2_gguf: Path) -> tuple[str, list[int], float, int]:
    """(text, its ids, HF's perplexity, HF's scored tokens) on the first ``SMOL_TOKENS`` held-out tokens."""
    from transformers import AutoModelForCausalLM

    from asyncllm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(smollm2_gguf)
    text = tokenizer.decode(tokenizer.encode(stdlib_text("heldout"))[:SMOL_TOKENS])
    ids = tokenizer.encode(text)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                              dtype=torch.float32).eval()
    expected, scored = hf_perplexity(hf, ids, SMOL_SEQLEN, SMOL_STRIDE)
    return text, ids, expected, scored


@pytest.mark.slow
@pytest.mark.parametrize("load", ["packed", "dequantized"])
def test_smollm2_gguf_matches_hf(smollm2_gguf: Path, smollm2_slice: tuple[str, list[int], float, int],
                                 load: str) -> None:
    text, ids, expected, scored = smollm2_slice
    result = perplexity(smollm2_gguf, text, seqlen=SMOL_SEQLEN, stride=SMOL_STRIDE, device="cpu",
                        dequantize_weights=load == "dequantized")
    assert result.text_tokens == len(ids) and result.tokens == scored == len(ids) - 1 and result.windows == 4
    assert result.perplexity == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
def test_smollm2_kv_cache_quantization_costs(smollm2_gguf: Path, smollm2_slice: tuple[str, list[int], float, int]
                                             ) -> None:
    """The short windows attend over an int8 / k8v4 / int4 cache: int8 within 0.5% of the float cache (HF's
    number, checked above), and the 4-bit caches cost more, k8v4 less than int4."""
    text, _ids, expected, _scored = smollm2_slice
    costs = {}
    for dtype in ("int8", "int4", "k8v4"):
        result = perplexity(smollm2_gguf, text, seqlen=SMOL_SEQLEN, stride=SMOL_STRIDE, device="cpu",
                            kv_cache_dtype=dtype)
        assert result.kv_cache_dtype == dtype
        costs[dtype] = result.perplexity / expected - 1
    assert abs(costs["int8"]) < 0.005, costs
    assert costs["int8"] < costs["k8v4"] < costs["int4"] < 0.1, costs


FIDELITY_TOKENS = 2048
"""The first 2,048 held-out tokens in the docs' windows (seqlen 512, stride 256: seven windows); the 4-bit
caches cost more here than on the whole text (int4 +2.8% here, +2.2% on all of it: docs/quantization.md)."""


@pytest.fixture(scope="module")
def fidelity_text(smollm2_gguf: Path) -> tuple[str, Any]:
    """The ``FIDELITY_TOKENS`` text and its perplexity over the float32 cache."""
    from asyncllm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(smollm2_gguf)
    text = tokenizer.decode(tokenizer.encode(stdlib_text("heldout"))[:FIDELITY_TOKENS])
    return text, perplexity(smollm2_gguf, text, device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache_dtype", ["int4", "k8v4"])
def test_smollm2_4bit_kv_caches_stay_within_3_percent(smollm2_gguf: Path, fidelity_text: tuple[str, Any],
                                                      kv_cache_dtype: str) -> None:
    """The 4-bit caches' target: perplexity within +3% of the float32 cache's (the engine's float32 path is
    HF's: ``test_smollm2_gguf_matches_hf``), in the protocol docs/quantization.md reports."""
    text, plain = fidelity_text
    quantized = perplexity(smollm2_gguf, text, device="cpu", kv_cache_dtype=kv_cache_dtype)
    assert (plain.seqlen, plain.stride, plain.windows) == (512, 256, 7) and quantized.tokens == plain.tokens
    cost = quantized.perplexity / plain.perplexity - 1
    assert 0 < cost <= 0.03, cost
