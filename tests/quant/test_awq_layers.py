"""AWQ on asyncllm's own decoder layers: scales fold without changing the function, and the weights come back
under the checkpoint's names."""

from __future__ import annotations

import pytest
import torch

from asyncllm.config import ModelConfig
from asyncllm.kernels import get_kernel_ops
from asyncllm.models import build_model
from asyncllm.offline_batch import OfflineBatch
from asyncllm.quant import awq_layers
from asyncllm.quant.awq_layers import LayerCalibration
from asyncllm.quant.awq_search import QuantScheme
from asyncllm.quant.hf_export import hf_tensors

from ._writers import tiny_model


def _model(kv_heads: int, tied: bool = False):  # type: ignore[no-untyped-def]
    hf_config, state = tiny_model("llama", seed=kv_heads)
    hf_config = {**hf_config, "num_key_value_heads": kv_heads, "tie_word_embeddings": tied}
    if kv_heads != 2 or tied:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(kv_heads)
        reference = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf_config.items() if k != "architectures"}))
        state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
        if tied:
            state.pop("lm_head.weight", None)
    model = build_model(ModelConfig.from_hf_config(hf_config), get_kernel_ops("auto", torch.device("cpu")),
                        dtype=torch.float32, device=torch.device("cpu"))
    model.load_weights(state.items())
    return model, state


@pytest.mark.parametrize("tied", [False, True])
def test_hf_tensors_give_back_the_checkpoint(tied: bool) -> None:
    model, state = _model(2, tied)
    dense, linears = hf_tensors(model)
    names = set(dense) | {f"{name}.weight" for name in linears}
    assert names == set(state)
    for name, tensor in state.items():
        got = dense.get(name, linears.get(name.removesuffix(".weight")))
        assert torch.equal(got, tensor), name
    assert set(linears) == {n.removesuffix(".weight") for n in state if n.endswith("_proj.weight")}


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query (no v -> o group) and multi-head (with it)
def test_scales_fold_without_changing_the_layer(kv_heads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _model(kv_heads)
    # no clipping: clip limits equal to each group's largest magnitude leave the weights as they are
    monkeypatch.setattr(awq_layers, "search_clip",
                        lambda weight, x, group, scheme: weight.float().abs().reshape(
                            weight.shape[0], -1, group).amax(-1))
    batch = OfflineBatch.of([24, 17, 32], block_size=8)
    (cache,) = batch.scratch_caches(model.config, 1, dtype=torch.float32, device="cpu")
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(batch.num_tokens, 64, generator=generator)
    hidden[:, 7] *= 25.0  # an outlier channel, so the searches pick scales other than 1
    layer = model.model.layers[0]
    with torch.inference_mode():
        block, residual = layer(batch.positions, hidden.clone(), None, batch.meta, cache)
        before = block + residual
        calibration = LayerCalibration(QuantScheme(4, False), lambda k: 32, batch, cache)
        output, report = calibration.run(layer, 0, hidden)
        block, residual = layer(batch.positions, hidden.clone(), None, batch.meta, cache)
        after = block + residual

    assert torch.equal(output, before)  # the next layer's input is the full-precision output
    assert ("v_o" in report.searches) == (kv_heads == 4)
    assert any(search.ratio is not None for search in report.searches.values())
    assert all(search.error <= search.rtn_error for search in report.searches.values())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_clipping_bounds_every_clipped_weight() -> None:
    model, _ = _model(2)
    batch = OfflineBatch.of([20, 20], block_size=8)
    (cache,) = batch.scratch_caches(model.config, 1, dtype=torch.float32, device="cpu")
    hidden = torch.randn(batch.num_tokens, 64, generator=torch.Generator().manual_seed(6))
    layer = model.model.layers[0]
    q_rows = layer.self_attn.qkv_proj.output_sizes[0] + layer.self_attn.qkv_proj.output_sizes[1]
    qk_before = layer.self_attn.qkv_proj.weight[:q_rows].clone()
    with torch.inference_mode():
        LayerCalibration(QuantScheme(4, False), lambda k: 32, batch, cache).run(layer, 0, hidden)
    # the query and key rows are scaled (columns) but never clipped: their column-wise ratios are uniform
    ratio = layer.self_attn.qkv_proj.weight[:q_rows] / qk_before
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-5, atol=1e-5)


def test_scale_candidates_are_scored_on_evenly_spaced_whole_sequences() -> None:
    batch = OfflineBatch.of([300] * 9 + [50], block_size=16)
    sub, rows = awq_layers._search_subset(batch, 1000, torch.device("cpu"))
    assert sub.lengths == (300, 300, 300)
    starts = batch.starts
    picked = [0, 3, 7]  # round(i * 10 / 3)
    assert torch.equal(rows, torch.cat([torch.arange(starts[i], starts[i] + 300) for i in picked]))
    whole, all_rows = awq_layers._search_subset(batch, 10_000, torch.device("cpu"))
    assert whole.lengths == batch.lengths and torch.equal(all_rows, torch.arange(batch.num_tokens))
    one, _ = awq_layers._search_subset(batch, 10, torch.device("cpu"))
    assert one.lengths == (300,)
