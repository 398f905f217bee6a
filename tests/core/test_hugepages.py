"""``place_in_arena``: parameters move into one aligned buffer without changing what the module computes."""

from __future__ import annotations

import torch
from torch import nn

from asyncllm.hugepages import HUGE_PAGE_BYTES, place_in_arena


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 24)
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter under two names
        self.extra = nn.Parameter(torch.randn(3, 5, dtype=torch.float64))  # another dtype, odd size

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.head(x) + self.norm(self.proj(x)).sum(-1, keepdim=True) + self.extra.sum().float()


def test_values_ties_and_outputs_survive_the_move() -> None:
    torch.manual_seed(0)
    module = _Tied()
    ids = torch.tensor([1, 7, 42])
    expected = module(ids).detach()
    before = {name: param.detach().clone() for name, param in module.named_parameters()}
    objects = [id(param) for param in module.parameters()]

    arena = place_in_arena(module)

    assert arena is not None and arena.num_parameters == len(before)
    assert [id(param) for param in module.parameters()] == objects
    assert module.head.weight is module.embed.weight
    storages = {param.untyped_storage().data_ptr() for param in module.parameters()}
    assert len(storages) == 1
    for name, param in module.named_parameters():
        assert torch.equal(param, before[name]) and param.dtype == before[name].dtype
        assert param.data_ptr() % 64 == 0
    first = next(module.parameters())
    assert first.data_ptr() % HUGE_PAGE_BYTES == 0
    torch.testing.assert_close(module(ids), expected, rtol=0, atol=0)
    total = sum(param.numel() * param.element_size() for param in module.parameters())
    assert total <= arena.nbytes < total + 64 * len(before)


def test_without_copy_only_storage_changes_and_training_still_works() -> None:
    module = nn.Linear(8, 4)
    place_in_arena(module, copy=False, huge_pages=False)
    with torch.no_grad():
        module.weight.fill_(0.5)
        module.bias.zero_()
    loss = module(torch.ones(2, 8)).sum()
    loss.backward()
    assert module.weight.grad is not None and torch.all(module.weight.grad == 2)
    assert module.weight.untyped_storage().data_ptr() == module.bias.untyped_storage().data_ptr()


def test_modules_without_cpu_parameters_are_left_alone() -> None:
    assert place_in_arena(nn.ReLU()) is None
    meta = nn.Linear(4, 4, device="meta")
    assert place_in_arena(meta) is None
    assert meta.weight.device.type == "meta"
