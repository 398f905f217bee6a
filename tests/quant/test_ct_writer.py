"""The compressed-tensors ``pack-quantized`` writer against independent references: the ``compressed_tensors``
package's own compressor and decompressor (tensors byte for byte), its and transformers' target matching,
Hugging Face transformers loading the written directory (logits and greedy tokens against asyncllm's), and
both tokenizer loaders."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncllm.loaders import load_checkpoint
from asyncllm.quant.compressed_tensors import unpack_pack_quantized
from asyncllm.quant.ct_writer import pack_quantized_state, write_quantized_checkpoint
from asyncllm.quant.layer_quant import LayerQuant
from asyncllm.quant.packed import QuantCodes
from asyncllm.quant.rtn import quantize_rtn
from asyncllm.tokenizer import Tokenizer

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

from ._ct import decompress, scheme
from ._writers import quantized_prefix
from .test_quantized_models import _greedy, _logits

SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GROUPS = {64: 32, 128: 64}
"""Group size by input size in the tiny model: q/k/v/o/gate/up (K=64) in groups of 32, down (K=128) of 64:
two config groups, as SmolLM2's 576 / 1536 inputs give groups of 64 and 128."""
PROMPT = [(7 * i * i + 3 * i + 1) % 97 for i in range(12)]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers."},
        {"role": "assistant", "content": "The Nile, the Rhine, 你好 🙂"}, {"role": "user", "content": "Story?"}]
TEXTS = ["Hello world! Café, naïve 12345.", "", "<|im_start|>user\nhi<|im_end|>", " leading space 🎉"]


def _rounded(codes: QuantCodes, scale_dtype: torch.dtype) -> QuantCodes:
    """``codes`` with their scales rounded to ``scale_dtype`` (the codes kept: the weight is what they say)."""
    return QuantCodes(codes.codes, codes.scales.to(scale_dtype).float(), codes.zeros, codes.mins, bits=codes.bits,
                      group_size=codes.group_size)


def _codes(n: int, k: int, bits: int, group_size: int | None, symmetric: bool, scale_dtype: torch.dtype,
           seed: int = 0) -> QuantCodes:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1
    return _rounded(quantize_rtn(weight, bits, group_size, symmetric), scale_dtype)


# ---------------------------------------------------------------------- one linear


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), groups=st.integers(1, 4), group=st.sampled_from([16, 32, 64]),
       bits=st.sampled_from([4, 8]), symmetric=st.booleans(), channel=st.booleans(),
       scale_dtype=st.sampled_from(SCALE_DTYPES), seed=st.integers(0, 2**16))
def test_packing_matches_the_package(n: int, groups: int, group: int, bits: int, symmetric: bool, channel: bool,
                                     scale_dtype: torch.dtype, seed: int) -> None:
    k = group * groups
    codes = _codes(n, k, bits, None if channel else group, symmetric, scale_dtype, seed)
    state = pack_quantized_state(codes, symmetric=symmetric, scale_dtype=scale_dtype)
    ct_scheme = scheme(bits, None if channel else group, symmetric)
    # The package's dequantization of what was written is the codes' weight, exactly (in the scale dtype).
    assert torch.equal(decompress(state, ct_scheme), codes.dequantize().to(scale_dtype))
    # The package's compressor, given that weight and the same parameters, writes the very same tensors.
    qparams: dict[str, torch.Tensor] = {"weight": codes.dequantize(), "weight_scale": codes.scales.to(scale_dtype)}
    if not symmetric:
        qparams["weight_zero_point"] = (codes.zeros - 2 ** (bits - 1)).to(torch.int8)
    reference = dict(PackedQuantizationCompressor.compress(qparams, ct_scheme))
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert (state[name].dtype, state[name].shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(state[name], tensor), name
    # And asyncllm's reader gives the codes back.
    back = unpack_pack_quantized(state["weight_packed"], state["weight_scale"], state["weight_shape"],
                                 state.get("weight_zero_point"), bits=bits).codes
    assert back.group_size == codes.group_size
    for field in ("codes", "scales", "zeros", "mins"):
        assert torch.equal(getattr(back, field), getattr(codes, field)), field


def _replace(original: QuantCodes, **fields: Any) -> QuantCodes:
    names = ("codes", "scales", "zeros", "mins", "bits", "group_size")
    return QuantCodes(**{**{name: getattr(original, name) for name in names}, **fields})


def _refusals() -> list[tuple[str, QuantCodes, bool, torch.dtype, str]]:
    sym = _codes(8, 64, 4, 32, True, torch.bfloat16)
    asym = _codes(8, 64, 4, 32, False, torch.bfloat16)
    exact = _codes(8, 64, 4, 32, False, torch.float32)
    return [
        ("mins", _replace(asym, mins=torch.full_like(asym.mins, 0.5)), False, torch.bfloat16, "mins"),
        ("fractional-zeros", _replace(asym, zeros=asym.zeros + 0.5), False, torch.bfloat16, "zeros"),
        ("symmetric-zeros", asym, True, torch.bfloat16, "zeros"),
        ("zeros-range", _replace(asym, zeros=torch.full_like(asym.zeros, 16.0)), False, torch.bfloat16, "zeros"),
        ("scales-dtype", exact, False, torch.bfloat16, "scales"),
        ("scales-inf", _replace(sym, scales=torch.full_like(sym.scales, float("inf"))), True, torch.float32,
         "scales"),
        ("bits", _replace(sym, bits=3, codes=sym.codes.clamp(max=7), zeros=torch.full_like(sym.zeros, 4.0)), True,
         torch.bfloat16, "bits"),
        ("codes", _replace(sym, codes=sym.codes + 16, bits=4), True, torch.bfloat16, "codes"),
        ("scale_dtype", sym, True, torch.int8, "scale_dtype"),
    ]


@pytest.mark.parametrize(("codes", "symmetric", "scale_dtype", "field"), [r[1:] for r in _refusals()],
                         ids=[r[0] for r in _refusals()])
def test_inexpressible_codes_are_refused_by_field(codes: QuantCodes, symmetric: bool, scale_dtype: torch.dtype,
                                                  field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        pack_quantized_state(codes, symmetric=symmetric, scale_dtype=scale_dtype)


# ---------------------------------------------------------------------- a tiny random Llama


def _split(state: dict[str, torch.Tensor], bits: int, symmetric: bool, scale_dtype: torch.dtype,
           groups: dict[int, int | None] = GROUPS) -> tuple[dict[str, torch.Tensor], dict[str, QuantCodes]]:
    """The model's decoder linears RTN-quantized (group size by input size), everything else dense."""
    dense: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantCodes] = {}
    for name, tensor in state.items():
        prefix = quantized_prefix(name)
        if prefix is None:
            dense[name] = tensor
        else:
            weight = tensor.float()
            quantized[prefix] = _rounded(quantize_rtn(weight, bits, groups[weight.shape[1]], symmetric), scale_dtype)
    return dense, quantized


def _write(out: Path, parts: tuple[Any, dict[str, Any], dict], *, bits: int = 4, symmetric: bool = True,
           scale_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32, **kwargs: Any
           ) -> dict[str, QuantCodes]:
    tokenizer, hf_config, state = parts
    dense, quantized = _split(state, bits, symmetric, scale_dtype, **kwargs.pop("split", {}))
    kwargs.setdefault("tokenizer_from", tokenizer)
    write_quantized_checkpoint(out, hf_config=hf_config, dense=dense, quantized=quantized, bits=bits,
                               symmetric=symmetric, scale_dtype=scale_dtype, dtype=dtype, **kwargs)
    return quantized


@pytest.fixture(scope="module")
def sym4(tmp_path_factory: pytest.TempPathFactory, tiny_model_parts: tuple[Any, dict[str, Any], dict]
         ) -> tuple[Path, dict[str, QuantCodes]]:
    out = tmp_path_factory.mktemp("ct") / "sym4"
    return out, _write(out, tiny_model_parts)


def _config(out: Path) -> dict[str, Any]:
    return json.loads((out / "config.json").read_text())


def test_config_has_one_group_per_group_size(sym4: tuple[Path, dict[str, QuantCodes]]) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    out, _ = sym4
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert not list(out.parent.glob(".sym4*"))
    for path in out.iterdir():  # every file readable as the directory is (safetensors alone makes them 0600)
        assert path.stat().st_mode & 0o444 == out.stat().st_mode & 0o444, path.name
    config = _config(out)
    assert config["torch_dtype"] == config["dtype"] == "float32"
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == (
        "compressed-tensors", "pack-quantized", "compressed")
    assert qc["ignore"] == ["lm_head"]
    groups = qc["config_groups"]
    assert {name: g["weights"]["group_size"] for name, g in groups.items()} == {"group_0": 32, "group_1": 64}
    assert groups["group_0"]["targets"] == [r"re:(.*\.)?(gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)$"]
    assert groups["group_1"]["targets"] == [r"re:(.*\.)?(down_proj)$"]
    parsed = QuantizationConfig.model_validate(qc)  # the package accepts it as written
    assert parsed.model_dump()["config_groups"] == groups


def test_package_and_transformers_match_each_group_to_its_modules(
        sym4: tuple[Path, dict[str, QuantCodes]]) -> None:
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.utils import match_named_modules
    from transformers import AutoConfig, AutoModelForCausalLM

    out, quantized = sym4
    qc = _config(out)["quantization_config"]
    hf_config = {k: v for k, v in _config(out).items() if k != "quantization_config"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
    expected = {name: sorted(p for p, c in quantized.items() if c.group_size == g["weights"]["group_size"])
                for name, g in qc["config_groups"].items()}
    for name, group in qc["config_groups"].items():
        matched = sorted(n for n, _ in match_named_modules(model, group["targets"], qc["ignore"]))
        assert matched == expected[name], name
    apply_quantization_config(model, QuantizationConfig.model_validate(qc))  # as transformers' loader does
    schemes = {n: m.quantization_scheme.weights.group_size for n, m in model.named_modules()
               if getattr(m, "quantization_scheme", None) is not None}
    assert schemes == {p: c.group_size for p, c in quantized.items()}


def test_asyncllm_loads_it_packed_and_exactly(sym4: tuple[Path, dict[str, QuantCodes]],
                                              tiny_model_parts: tuple[Any, dict[str, Any], dict]) -> None:
    out, quantized = sym4
    checkpoint = load_checkpoint(out)
    assert dict(checkpoint.quantization.layers) == {
        p: LayerQuant(bits=4, group_size=c.group_size) for p, c in quantized.items()}
    dense = dict(load_checkpoint(out, dequantize_weights=True).tensors(torch.float32))
    _, _, state = tiny_model_parts
    assert dense.keys() == state.keys()
    for name, tensor in state.items():
        prefix = quantized_prefix(name)
        expected = tensor if prefix is None else quantized[prefix].dequantize()
        assert torch.equal(dense[name], expected), name


def _asyncllm_model(out: Path, groups: tuple[int, int] = (32, 64)) -> torch.nn.Module:
    from asyncllm.config import ModelConfig
    from asyncllm.kernels import get_kernel_ops
    from asyncllm.models import build_model

    checkpoint = load_checkpoint(out)
    model = build_model(ModelConfig.from_hf_config(checkpoint.hf_config), get_kernel_ops("torch", torch.device("cpu")),
                        dtype=torch.float32, device=torch.device("cpu"), quantization=checkpoint.quantization)
    model.load_weights(checkpoint.tensors(torch.float32))
    layer = model.model.layers[0]
    assert (layer.self_attn.qkv_proj.packed.group_size, layer.mlp.down_proj.packed.group_size) == groups
    return model


def _hf_model(out: Path, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs).eval()


@pytest.mark.parametrize(("bits", "scale_dtype"), [(4, torch.float32), (8, torch.bfloat16)])
def test_transformers_loads_the_symmetric_checkpoint_like_asyncllm(
        tmp_path: Path, tiny_model_parts: tuple[Any, dict[str, Any], dict], bits: int,
        scale_dtype: torch.dtype) -> None:
    """transformers (through compressed-tensors) reads the scales in the model dtype (float32 here) and
    decompresses each linear to ``(q - zp) * scale``: asyncllm's exact weight, so the logits agree to
    float32 rounding and the greedy tokens are the same."""
    out = tmp_path / "model"
    quantized = _write(out, tiny_model_parts, bits=bits, scale_dtype=scale_dtype)
    hf = _hf_model(out)
    ours = _asyncllm_model(out)
    with torch.no_grad():
        hf_tokens = hf.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False,
                                pad_token_id=0)[0, len(PROMPT):].tolist()
        hf_logits = hf(input_ids=torch.tensor([PROMPT + hf_tokens])).logits[0, len(PROMPT) - 1:-1]
    scale = float(hf_logits.abs().max())
    torch.testing.assert_close(_logits(ours, PROMPT, hf_tokens[:-1]), hf_logits, rtol=1e-4, atol=1e-4 * scale)
    assert _greedy(ours, PROMPT, 6) == hf_tokens
    for prefix, codes in quantized.items():  # decompressed by the first forward pass
        assert torch.equal(hf.get_submodule(prefix).weight.detach(), codes.dequantize()), prefix


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_transformers_loads_an_asymmetric_checkpoint_dequantized(
        tmp_path: Path, tiny_model_parts: tuple[Any, dict[str, Any], dict]) -> None:
    """What transformers 5.24 with compressed-tensors 0.20 can load of asymmetric ``pack-quantized``
    checkpoints (the package's own compressor's as much as these): not the default (compressed) way, which
    compresses the empty model on the meta device, where the compressor leaves ``weight_zero_point``
    unpacked ``[N, K / G]``, so the stored packed ``[N * b / 32, K / G]`` is a size mismatch; and with
    ``dequantize=True`` only a single config group, since that route decompresses every linear with the
    first group's scheme. So: one group size (32 for every linear), ``dequantize=True``."""
    from transformers import CompressedTensorsConfig

    out = tmp_path / "model"
    quantized = _write(out, tiny_model_parts, symmetric=False, split={"groups": {64: 32, 128: 32}})
    qc = _config(out)["quantization_config"]
    assert len(qc["config_groups"]) == 1
    hf = _hf_model(out, quantization_config=CompressedTensorsConfig(**qc, dequantize=True))
    for prefix, codes in quantized.items():
        assert torch.equal(hf.get_submodule(prefix).weight.detach(), codes.dequantize()), prefix
    ours = _asyncllm_model(out, groups=(32, 32))
    assert _greedy(ours, PROMPT, 6) == hf.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False,
                                                   pad_token_id=0)[0, len(PROMPT):].tolist()


def _check_tokenizer(out: Path, source: Tokenizer) -> None:
    from transformers import AutoTokenizer

    ours = Tokenizer.from_path(out)
    hf = AutoTokenizer.from_pretrained(out)
    assert ours.special_tokens == source.special_tokens
    assert ours.eos_token_ids == source.eos_token_ids and ours.bos_token_id == source.bos_token_id
    assert ours.all_special_ids == source.all_special_ids
    for text in TEXTS:
        ids = source.encode(text)
        assert ours.encode(text) == ids == hf.encode(text), text
        assert source.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == source.decode(ids, skip_special_tokens=skip)
            assert hf.decode(ids, skip_special_tokens=skip) == source.decode(ids, skip_special_tokens=skip)
    for prompt in (True, False):
        rendered = source.render_chat(CHAT, add_generation_prompt=prompt)
        assert ours.render_chat(CHAT, add_generation_prompt=prompt) == rendered
        assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt) == rendered
    assert hf.eos_token == source.special_tokens["eos_token"] and hf.bos_token == source.special_tokens["bos_token"]


def test_tokenizer_files_load_in_both(sym4: tuple[Path, dict[str, QuantCodes]], tmp_path: Path,
                                      tiny_model_parts: tuple[Any, dict[str, Any], dict]) -> None:
    out, _ = sym4
    source = tiny_model_parts[0]
    _check_tokenizer(out, source)
    # From a Hugging Face directory (a path or its Checkpoint), the tokenizer files are copied as they are.
    for name, tokenizer_from in (("path", out), ("checkpoint", load_checkpoint(out))):
        again = tmp_path / name
        _write(again, tiny_model_parts, tokenizer_from=tokenizer_from)
        for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (again / file).read_bytes() == (out / file).read_bytes(), (name, file)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        _write(tmp_path / "none", tiny_model_parts, tokenizer_from=tmp_path)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(("add_bos", "add_eos"), [(True, False), (False, False), (True, True)])
def test_explicit_bos_eos_flags_become_the_post_processor(tmp_path: Path, add_bos: bool, add_eos: bool) -> None:
    """A GGUF tokenizer says with flags whether BOS / EOS are added (here over a backend whose own
    post-processor always prepends BOS): the written tokenizer.json does exactly what the flags say."""
    from asyncllm.loaders.hf_dir_writer import write_tokenizer_files

    from ..core._tokenizers import CHATML_TEMPLATE, build_sentencepiece_backend

    source = Tokenizer(build_sentencepiece_backend("metaspace"), bos_token="<s>", eos_token="</s>",
                       unk_token="<unk>", add_bos_token=add_bos, add_eos_token=add_eos,
                       chat_template=CHATML_TEMPLATE.replace("<|im_start|>", "<s>").replace("<|im_end|>", "</s>"))
    assert source.encode("hi")[:1] == ([1] if add_bos else [source.encode("hi", add_special_tokens=False)[0]])
    write_tokenizer_files(tmp_path, source)
    _check_tokenizer(tmp_path, source)


def test_engine_serves_it(sym4: tuple[Path, dict[str, QuantCodes]]) -> None:
    from asyncllm import AsyncEngine

    out, _ = sym4
    engine = AsyncEngine.from_pretrained(out, device="cpu", kv_cache_tokens=256)

    async def run() -> Any:
        try:
            return await engine.generate(CHAT[:2], temperature=0.0, max_tokens=4)
        finally:
            await engine.aclose()

    result = asyncio.run(run())
    assert result.token_ids and engine.stats().weight_quantization == "compressed-tensors"


def test_shards_and_channel_groups(tmp_path: Path, tiny_model_parts: tuple[Any, dict[str, Any], dict],
                                   sym4: tuple[Path, dict[str, QuantCodes]]) -> None:
    """Above ``max_shard_bytes`` the tensors go to numbered shards with an index (a module's parts together);
    linears quantized one group per row form a ``channel`` group; dense tensors take ``dtype``."""
    out = tmp_path / "sharded"
    quantized = _write(out, tiny_model_parts, dtype=torch.bfloat16, max_shard_bytes=40_000,
                       split={"groups": {64: 32, 128: None}})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == [f"model-{i:05d}-of-{len(files):05d}.safetensors"
                                        for i in range(1, len(files) + 1)]
    for prefix in quantized:
        assert len({f for n, f in index["weight_map"].items() if n.startswith(prefix + ".")}) == 1, prefix
    config = _config(out)
    assert config["torch_dtype"] == "bfloat16"
    groups = config["quantization_config"]["config_groups"]
    assert groups["group_1"]["weights"] == {"num_bits": 4, "type": "int", "symmetric": True, "group_size": None,
                                            "strategy": "channel", "dynamic": False}
    dense = dict(load_checkpoint(out, dequantize_weights=True).tensors(torch.float32))
    _, _, state = tiny_model_parts
    for name, tensor in state.items():
        prefix = quantized_prefix(name)
        expected = tensor.to(torch.bfloat16).float() if prefix is None else quantized[prefix].dequantize()
        assert torch.equal(dense[name], expected), name
    assert load_checkpoint(out).quantization.layers["model.layers.1.mlp.down_proj"] == LayerQuant(4, None)


def test_overlapping_projection_names_get_exact_targets_and_dense_ones_are_ignored(
        tmp_path: Path, tiny_model_parts: tuple[Any, dict[str, Any], dict]) -> None:
    """Layer 0's down_proj in groups of 32, layer 1's in groups of 64: one projection name in two groups, so
    the targets name the modules; a dense o_proj a regex target would take is listed in ``ignore``."""
    _, hf_config, state = tiny_model_parts
    dense, quantized = _split(state, 4, True, torch.float32)
    quantized["model.layers.0.mlp.down_proj"] = quantize_rtn(state["model.layers.0.mlp.down_proj.weight"], 4, 32,
                                                             True)
    write_quantized_checkpoint(tmp_path / "a", hf_config=hf_config, dense=dense, quantized=quantized, bits=4,
                               symmetric=True, scale_dtype=torch.float32, dtype=torch.float32, tokenizer_from=None)
    groups = _config(tmp_path / "a")["quantization_config"]["config_groups"]
    assert groups["group_1"]["targets"] == ["model.layers.1.mlp.down_proj"]
    assert "model.layers.0.mlp.down_proj" in groups["group_0"]["targets"]
    assert dict(load_checkpoint(tmp_path / "a").quantization.layers) == {
        p: LayerQuant(bits=4, group_size=c.group_size) for p, c in quantized.items()}

    dense, quantized = _split(state, 4, True, torch.float32)
    dense["model.layers.1.self_attn.o_proj.weight"] = state["model.layers.1.self_attn.o_proj.weight"]
    del quantized["model.layers.1.self_attn.o_proj"]
    write_quantized_checkpoint(tmp_path / "b", hf_config=hf_config, dense=dense, quantized=quantized, bits=4,
                               symmetric=True, scale_dtype=torch.float32, dtype=torch.float32, tokenizer_from=None)
    qc = _config(tmp_path / "b")["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.layers.1.self_attn.o_proj"]
    assert re.match(qc["config_groups"]["group_0"]["targets"][0][3:], "model.layers.1.self_attn.o_proj")
    layers = load_checkpoint(tmp_path / "b").quantization.layers
    assert "model.layers.1.self_attn.o_proj" not in layers and len(layers) == 13
    hf = _hf_model(tmp_path / "b")
    assert type(hf.model.layers[1].self_attn.o_proj.weight) is torch.nn.Parameter
    assert torch.equal(hf.model.layers[1].self_attn.o_proj.weight.detach(),
                       state["model.layers.1.self_attn.o_proj.weight"])


def test_tied_tensors_are_written_once_each(tmp_path: Path, tiny_model_parts: tuple[Any, dict[str, Any], dict]
                                           ) -> None:
    """Dense tensors sharing memory (a tied LM head given under both names) are each written."""
    _, hf_config, state = tiny_model_parts
    dense, quantized = _split(state, 4, True, torch.float32)
    dense["lm_head.weight"] = dense["model.embed_tokens.weight"]
    write_quantized_checkpoint(tmp_path / "out", hf_config=hf_config, dense=dense, quantized=quantized, bits=4,
                               symmetric=True, scale_dtype=torch.float32, dtype=torch.float32, tokenizer_from=None)
    stored = dict(load_checkpoint(tmp_path / "out", dequantize_weights=True).tensors(torch.float32))
    assert torch.equal(stored["lm_head.weight"], state["model.embed_tokens.weight"])


# ---------------------------------------------------------------------- atomicity and refusals


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_failed_write_leaves_nothing(tmp_path: Path, tiny_model_parts: tuple[Any, dict[str, Any], dict],
                                       monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    import asyncllm.loaders.hf_dir_writer as writer

    calls: list[str] = []
    save = writer.save_file

    def failing(tensors: dict[str, torch.Tensor], filename: str, **kwargs: Any) -> None:
        calls.append(filename)
        if len(calls) == 2:  # mid-write: one shard is already on disk
            raise error
        save(tensors, filename, **kwargs)

    monkeypatch.setattr(writer, "save_file", failing)
    with pytest.raises(type(error)):
        _write(tmp_path / "out", tiny_model_parts, max_shard_bytes=40_000)
    assert len(calls) == 2 and Path(calls[0]).parent.name.startswith(".out.tmp-")
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("old")
    calls.clear()
    with pytest.raises(type(error)):
        _write(tmp_path / "old", tiny_model_parts, max_shard_bytes=40_000, overwrite=True)
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"] and not _leftovers(tmp_path, "old")


def test_existing_directories(tmp_path: Path, tiny_model_parts: tuple[Any, dict[str, Any], dict]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match=r"out_dir.*not empty.*overwrite"):
        _write(out, tiny_model_parts)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not _leftovers(tmp_path, "out")
    _write(out, tiny_model_parts, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not _leftovers(tmp_path, "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    _write(empty, tiny_model_parts)
    assert (empty / "config.json").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        _write(tmp_path / "file", tiny_model_parts, overwrite=True)


def test_writer_refusals_name_the_field_and_write_nothing(
        tmp_path: Path, tiny_model_parts: tuple[Any, dict[str, Any], dict]) -> None:
    _, hf_config, state = tiny_model_parts
    dense, quantized = _split(state, 4, True, torch.bfloat16)
    base = dict(hf_config=hf_config, dense=dense, quantized=quantized, bits=4, symmetric=True,
                scale_dtype=torch.bfloat16, dtype=torch.bfloat16, tokenizer_from=None)
    down = "model.layers.0.mlp.down_proj"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"dtype": torch.int8}, "dtype"),
        ({"scale_dtype": torch.float64}, "scale_dtype"),
        ({"bits": 3}, "bits"),
        ({"bits": 8}, r"model\.layers\.\d\.[a-z_.]+: bits"),
        ({"quantized": {down: _split(state, 4, False, torch.bfloat16)[1][down]}}, rf"{down}: zeros"),
        ({"quantized": _split(state, 4, True, torch.float32)[1]}, r"model\.layers\.\d\.[a-z_.]+: scales"),
        ({"quantized": {f"{down}.weight": quantized[down]}}, "quantized"),
        ({"quantized": {}}, "quantized"),
        ({"dense": {**dense, f"{down}.weight": state[f"{down}.weight"]}}, "dense"),
        ({"max_shard_bytes": 0}, "max_shard_bytes"),
    ]
    for change, field in cases:
        with pytest.raises(ValueError, match=rf"^{field}"):
            write_quantized_checkpoint(tmp_path / "out", **{**base, **change})
        assert sorted(p.name for p in tmp_path.iterdir()) == [], field


# ---------------------------------------------------------------------- the real SmolLM2


@pytest.mark.slow
def test_smollm2_gguf_written_as_compressed_tensors(smollm2_gguf: Path, tmp_path: Path) -> None:
    """SmolLM2's decoder linears RTN-quantized (groups of 64 for its 576 inputs, 128 for down_proj's 1536),
    with the GGUF's tokenizer: asyncllm loads the directory packed, and transformers' tokenizer renders the
    chat template and encodes as the GGUF's does."""
    from transformers import AutoTokenizer

    source = load_checkpoint(smollm2_gguf, dequantize_weights=True)
    dense: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantCodes] = {}
    for name, tensor in source.tensors(torch.float32):
        prefix = quantized_prefix(name)
        if prefix is None:
            dense[name] = tensor
        else:
            codes = quantize_rtn(tensor, 4, {576: 64, 1536: 128}[tensor.shape[1]], symmetric=True)
            quantized[prefix] = _rounded(codes, torch.bfloat16)
    assert len(quantized) == 7 * 30
    out = tmp_path / "smollm2-w4"
    write_quantized_checkpoint(out, hf_config=source.hf_config, dense=dense, quantized=quantized, bits=4,
                               symmetric=True, scale_dtype=torch.bfloat16, dtype=torch.bfloat16,
                               tokenizer_from=source)
    qc = _config(out)["quantization_config"]
    assert [g["weights"]["group_size"] for g in qc["config_groups"].values()] == [64, 128]
    checkpoint = load_checkpoint(out)
    layers = checkpoint.quantization.layers
    assert len(layers) == 210 and layers["model.layers.29.mlp.down_proj"] == LayerQuant(4, 128)
    assert layers["model.layers.0.self_attn.q_proj"] == LayerQuant(4, 64)
    streamed = dict(checkpoint.tensors(torch.float32))
    assert torch.equal(streamed["model.layers.3.mlp.down_proj.codes"], quantized["model.layers.3.mlp.down_proj"].codes)

    gguf_tokenizer = Tokenizer.from_gguf_metadata(source.gguf_metadata, path=smollm2_gguf)
    _check_tokenizer(out, gguf_tokenizer)
    hf = AutoTokenizer.from_pretrained(out)
    assert hf.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nName three rivers.<|im_end|>\n<|im_start|>assistant\n")
