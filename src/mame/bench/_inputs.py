"""How every measurement calls a model on its inputs: a tensor, positional arguments or keyword arguments."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

Inputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]


def call(model: Callable[..., Any], inputs: Inputs) -> Any:
    """``model(inputs)`` for a tensor, ``model(*inputs)`` for a sequence, ``model(**inputs)`` for a mapping."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def first_tensor(inputs: Inputs) -> torch.Tensor:
    """The first tensor among the inputs (its first dimension is the batch)."""
    values = list(inputs.values()) if isinstance(inputs, Mapping) else (
        list(inputs) if isinstance(inputs, (tuple, list)) else [inputs])
    return next(value for value in values if isinstance(value, torch.Tensor))


def move(inputs: Inputs, device: torch.device | None, dtype: torch.dtype | None) -> Inputs:
    """Inputs on ``device``; floating tensors also cast to ``dtype`` (token ids and masks keep theirs)."""
    def move_one(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return value.to(device=device, dtype=dtype if value.is_floating_point() else None)

    if isinstance(inputs, Mapping):
        return {key: move_one(value) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(move_one(value) for value in inputs)
    return move_one(inputs)


PADDING_MASKS = ("attention_mask", "pixel_attention_mask")  # transformers' names of a (B, L) padding mask


def samples(inputs: Inputs) -> list[Inputs]:
    """The batch's samples as batches of one; a mapping with a padding mask (`PADDING_MASKS`) loses each sample's
    padding, so a sample costs what it would cost alone."""
    batch = first_tensor(inputs).shape[0]
    if isinstance(inputs, torch.Tensor):
        return [inputs[i : i + 1] for i in range(batch)]
    if not isinstance(inputs, Mapping):
        return [[value[i : i + 1] if isinstance(value, torch.Tensor) else value for value in inputs]
                for i in range(batch)]
    mask = next((inputs[name] for name in PADDING_MASKS if isinstance(inputs.get(name), torch.Tensor)), None)
    result = []
    for i in range(batch):
        length = None if mask is None else int(mask[i].sum())
        result.append({
            name: value if not isinstance(value, torch.Tensor) else (
                value[i : i + 1, :length] if length is not None and value.dim() >= 2
                and value.shape[1] == mask.shape[1] else value[i : i + 1])
            for name, value in inputs.items()})
    return result
