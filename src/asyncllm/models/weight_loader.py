"""The generic weight loader: Hugging Face-named checkpoint tensors into a model's parameters.

A model declares ``packed_modules``: checkpoint module name -> (its merged module, shard id), e.g.
``"q_proj" -> ("qkv_proj", "q")``. Every tensor is routed to the module that owns the target parameter
and copied by its ``weight_loader(param, tensor, shard_id)`` (see ``layers.weights`` and
``layers.linear`` for that contract), so the loader knows no format, family or quantization method.
After the last tensor every module's ``process_weights_after_loading`` runs once (weight layout,
repacking), in module order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from asyncllm.layers.weights import ShardId, WeightLoading, load_unsharded

PackedModules = Mapping[str, tuple[str, ShardId]]


def load_named_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    packed_modules: PackedModules,
    *,
    skip: Callable[[str], bool] = lambda name: False,
    route: Callable[[str], tuple[str, ShardId] | None] = lambda name: None,
) -> None:
    """Fill every parameter of ``model`` from ``weights``, then post-process every module.

    Names for which ``skip`` is true are ignored; ``route`` may map a name to its ``(parameter name,
    shard id)`` directly (e.g. one expert's slice of a stacked tensor) before ``packed_modules`` is consulted.
    After consuming ``weights``, raises ``ValueError`` listing every unexpected name and every missing one
    (in checkpoint names); a tensor of the wrong shape raises ``ValueError`` naming it. A parameter shared
    by two modules (tied) is loaded once, under the name of its first owner.
    """
    unpacked = {merged: name for name, merged in packed_modules.items()}
    owners = parameter_owners(model)
    loaded: set[tuple[str, ShardId]] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        if skip(name):
            continue
        target, shard_id = route(name) or _to_param_name(name, packed_modules)
        owner = owners.get(target)
        if owner is None:
            unexpected.append(name)
            continue
        module, param = owner
        try:
            if isinstance(module, WeightLoading):
                module.weight_loader(param, tensor, shard_id)
            else:
                load_unsharded(param, tensor, shard_id)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        loaded.add((target, shard_id))
    missing = [
        _to_checkpoint_name(target, shard_id, unpacked)
        for target, (module, _) in owners.items()
        for shard_id in (module.shard_ids if isinstance(module, WeightLoading) else (None,))
        if (target, shard_id) not in loaded
    ]
    if unexpected or missing:
        raise ValueError(
            f"load_weights: unexpected parameters {sorted(unexpected)}; missing parameters {sorted(missing)}"
        )
    for module in model.modules():
        process = getattr(module, "process_weights_after_loading", None)
        if process is not None and module is not model:
            process()


def parameter_owners(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Parameter]]:
    """Each distinct parameter's full name -> (owning module, parameter); a tied tensor appears once."""
    owners: dict[str, tuple[nn.Module, nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            owners[f"{module_name}.{param_name}" if module_name else param_name] = (module, param)
    return owners


def _to_param_name(checkpoint_name: str, packed: PackedModules) -> tuple[str, ShardId]:
    parts = checkpoint_name.split(".")
    for i, part in enumerate(parts[:-1]):
        merged = packed.get(part)
        if merged is not None:
            parts[i] = merged[0]
            return ".".join(parts), merged[1]
    return checkpoint_name, None


def _to_checkpoint_name(param_name: str, shard_id: ShardId, unpacked: Mapping[tuple[str, ShardId], str]) -> str:
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        original = unpacked.get((part, shard_id))
        if original is not None:
            parts[i] = original
            return ".".join(parts)
    return param_name
