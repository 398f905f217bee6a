"""The ``asyncllm`` command line: options, validation before loading, and the chat commands."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from asyncllm import assets
from asyncllm.cli import main, package_version
from asyncllm.cli_options import parse_bytes

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"asyncllm {package_version()}"
    assert out.split()[1][0].isdigit()


def test_python_dash_m_version() -> None:
    done = subprocess.run([sys.executable, "-m", "asyncllm", "--version"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""}, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"asyncllm {package_version()}"


@pytest.fixture
def tiny_cli(make_tiny_engine: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list[Any]]:
    """``AsyncEngine.from_pretrained`` answers with the tiny engine; records the loads and the prompts sent.
    The default model path points at a file that is never read."""
    from asyncllm.engine import AsyncEngine

    seen: dict[str, list[Any]] = {"loads": [], "prompts": []}

    def from_pretrained(model: Any, **overrides: Any) -> AsyncEngine:
        seen["loads"].append((str(model), overrides))
        return make_tiny_engine(**overrides)

    original = AsyncEngine.stream_detailed

    def stream_detailed(self: AsyncEngine, prompt: Any, **kwargs: Any) -> Any:
        seen["prompts"].append(prompt)
        return original(self, prompt, **kwargs)

    monkeypatch.setattr(AsyncEngine, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(AsyncEngine, "stream_detailed", stream_detailed)
    monkeypatch.setattr(assets, "default_model_path", lambda: tmp_path / "default.gguf")
    return seen


def test_generate_applies_the_chat_template_unless_raw(tiny_cli: dict[str, list[Any]],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "some/model", "Hello", "--max-tokens", "3", "--seed", "1"]
    assert main(base) == 0
    assert main([*base, "--raw"]) == 0
    assert main([*base, "--chat"]) == 0  # the old opt-in: accepted, changes nothing
    assert tiny_cli["prompts"] == [[{"role": "user", "content": "Hello"}], "Hello",
                                   [{"role": "user", "content": "Hello"}]]
    outputs = capsys.readouterr().out.splitlines()
    assert outputs[0] == outputs[2]
    with pytest.raises(SystemExit):
        main([*base, "--raw", "--chat"])


@pytest.mark.parametrize("command", [["chat", "default"], ["generate", "default", "hi"], ["chat"]])
def test_default_names_the_default_model(command: list[str], tiny_cli: dict[str, list[Any]],
                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\n"))
    assert main([*command, "--max-tokens", "2"]) == 0
    assert tiny_cli["loads"][0][0] == str(tmp_path / "default.gguf")


@pytest.mark.parametrize("command", [
    ["chat"], ["generate", "m", "hi"], ["serve", "m"], ["gradio", "m"], ["eval", "perplexity", "m"],
    ["quantize", "m", "--out", "never-written"],
])
def test_an_unusable_cuda_device_is_a_one_line_error(command: list[str], monkeypatch: pytest.MonkeyPatch,
                                                      tiny_cli: dict[str, list[Any]],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main([*command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"asyncllm {command[0]}: error: device: 'cuda' requested")
    assert "\n" not in err and not tiny_cli["loads"]


def test_a_malformed_device_is_refused_before_loading(tiny_cli: dict[str, list[Any]],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "m", "--device", "tpu"]) == 2
    assert "asyncllm serve: error: device: must be" in capsys.readouterr().err
    assert not tiny_cli["loads"]


@pytest.mark.parametrize(("option", "field"), [
    (["--temperature", "-1"], "temperature"), (["--top-p", "2"], "top_p"), (["--max-tokens", "0"], "max_tokens"),
])
@pytest.mark.parametrize("command", [["chat", "/no/such/model"], ["generate", "/no/such/model", "hi"],
                                     ["gradio", "/no/such/model"]])
def test_sampling_options_are_checked_before_the_model_loads(command: list[str], option: list[str], field: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, *option]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"asyncllm {command[0]}: error: {field}: ")
    assert "no/such/model" not in err and "loading" not in err


@pytest.mark.parametrize("command", [["chat"], ["generate", "m", "hi"], ["serve"], ["gradio"]])
def test_deployment_knobs_parse_into_engine_overrides(command: list[str]) -> None:
    from asyncllm.cli import _engine_overrides, build_parser

    parser = build_parser()
    args = parser.parse_args([*command, "--max-batch-size", "8", "--gpu-memory-fraction", "0.5",
                              "--kv-cache-tokens", "2048", "--max-model-len", "512", "--device", "cpu",
                              "--dtype", "bfloat16", "--dequantize-weights", "--kv-cache-dtype", "int4",
                              "--quant-policy", "4", "--kv-cache-memory", "1.5GiB", "--tensor-parallel-size", "2"])
    assert _engine_overrides(args) == {
        "device": "cpu", "dtype": "bfloat16", "max_model_len": 512, "kv_cache_tokens": 2048,
        "gpu_memory_fraction": 0.5, "max_num_seqs": 8, "dequantize_weights": True, "kv_cache_dtype": "int4",
        "quant_policy": 4, "kv_cache_bytes": 3 * 2**29, "tensor_parallel_size": 2,
    }
    assert parser.parse_args([*command, "--max-num-seqs", "3"]).max_num_seqs == 3  # the alias
    defaults = parser.parse_args(command)
    assert _engine_overrides(defaults) == {"device": "auto", "dtype": None, "max_model_len": None}
    assert (defaults.kv_cache_dtype, defaults.quant_policy) == ("auto", 0)


def test_engine_option_help_states_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--device", "--dtype", "--kv-cache-tokens", "--gpu-memory-fraction", "--max-model-len",
                   "--max-num-seqs", "--kv-cache-dtype", "--quant-policy", "--kv-cache-memory", "--threads",
                   "--dequantize-weights", "--tensor-parallel-size"):
        help_text = text.split(option, 2)[-1].split(" --")[0]  # the option's entry in the options list
        assert "default" in help_text, option


def test_engine_option_defaults_reach_the_engine(tiny_cli: dict[str, list[Any]]) -> None:
    assert main(["generate", "m", "hi", "--max-tokens", "1", "--max-batch-size", "4",
                 "--gpu-memory-fraction", "0.6"]) == 0
    assert tiny_cli["loads"][0][1]["max_num_seqs"] == 4
    assert tiny_cli["loads"][0][1]["gpu_memory_fraction"] == 0.6


@pytest.mark.parametrize(("option", "message"), [
    (["--kv-cache-dtype", "int3"], "kv_cache_dtype: must be one of ['auto', 'int8', 'int4', 'k8v4'], got 'int3'"),
    (["--quant-policy", "5"], "quant_policy: must be 0 (off), 8 (int8) or 4 (int4), got 5"),
    (["--quant-policy", "8", "--kv-cache-dtype", "int4"], "quant_policy: 8 means kv_cache_dtype='int8'"),
    (["--quant-policy", "4", "--kv-cache-dtype", "k8v4"], "quant_policy: 4 means kv_cache_dtype='int4'"),
    (["--max-batch-size", "0"], "max_num_seqs: must be positive"),
    (["--gpu-memory-fraction", "1.5"], "gpu_memory_fraction: must be in (0, 1]"),
    (["--threads", "0"], "num_threads: must be an int >= 1"),
    (["--tensor-parallel-size", "0"], "tensor_parallel_size: must be an int >= 1, got 0"),
    (["--tensor-parallel-size", "-2"], "tensor_parallel_size: must be an int >= 1, got -2"),
])
@pytest.mark.parametrize("command", [["chat", "m"], ["generate", "m", "hi"], ["serve", "m"], ["gradio", "m"]])
def test_unavailable_or_invalid_engine_options_exit_2(command: list[str], option: list[str], message: str,
                                                      tiny_cli: dict[str, list[Any]],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, *option]) == 2
    assert capsys.readouterr().err.strip().startswith(f"asyncllm {command[0]}: error: {message}")
    assert not tiny_cli["loads"]


@pytest.mark.parametrize("command", [["chat", "m"], ["generate", "m", "hi"]])
def test_threads_option_reaches_the_engine_config(command: list[str], tiny_cli: dict[str, list[Any]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main([*command, "--max-tokens", "1", "--threads", "3"]) == 0
    assert tiny_cli["loads"][0][1]["num_threads"] == 3
    tiny_cli["loads"].clear()
    assert main([*command, "--max-tokens", "1"]) == 0
    assert "num_threads" not in tiny_cli["loads"][0][1]  # the engine's default


@pytest.mark.parametrize("command", ["chat", "generate", "serve", "gradio", "bench"])
def test_every_engine_command_takes_threads(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--threads N" in capsys.readouterr().out


def test_kv_cache_quantization_reaches_the_engine(tiny_cli: dict[str, list[Any]]) -> None:
    assert main(["generate", "m", "hi", "--max-tokens", "1", "--kv-cache-dtype", "auto",
                 "--quant-policy", "0"]) == 0
    assert main(["generate", "m", "hi", "--max-tokens", "1", "--quant-policy", "8",
                 "--kv-cache-memory", "64MB"]) == 0
    assert tiny_cli["loads"][1][1]["quant_policy"] == 8
    assert tiny_cli["loads"][1][1]["kv_cache_bytes"] == 64 * 10**6
    assert main(["generate", "m", "hi", "--max-tokens", "1", "--kv-cache-dtype", "k8v4"]) == 0
    assert tiny_cli["loads"][2][1]["kv_cache_dtype"] == "k8v4"


def test_kv_cache_memory_sizes_parse() -> None:
    assert [parse_bytes(text) for text in ("512MiB", "2GB", "1.5 GiB", "4096", "10kb")] == [
        512 * 2**20, 2 * 10**9, 3 * 2**29, 4096, 10_000]
    for bad in ("12 parsecs", "-1GB", "0", "GiB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_chat_reads_commands_and_messages_from_stdin(tiny_cli: dict[str, list[Any]],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("/help\n/nope\nHello\n/stats\n"))  # then end of input
    assert main(["chat", "m", "--max-tokens", "3", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "/system TEXT" in captured.err and "unknown command /nope" in captured.err
    assert "last reply: 3 tokens" in captured.err
    assert captured.out.strip()  # the reply


def test_chat_sends_a_fenced_block_as_one_message(tiny_cli: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('"""\nline one\nline two\n"""\n/stats\n'))
    assert main(["chat", "m", "--max-tokens", "2", "--temperature", "0"]) == 0
    assert "last reply: 2 tokens" in capsys.readouterr().err
