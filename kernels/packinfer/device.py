"""What the library asks of the device: its SM count, which the planners balance work over."""

from __future__ import annotations

import functools

import torch

#: SMs assumed where the device is not a CUDA GPU (an H100 SXM's 132): the library's one fallback.
FALLBACK_SMS = 132


def num_sms(device: torch.device | str) -> int:
    """The device's streaming-multiprocessor count; FALLBACK_SMS (132) when it is not a CUDA device."""
    device = torch.device(device)
    if device.type != "cuda":
        return FALLBACK_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sms(index: int) -> int:
    """Asked once per GPU (the property query costs host time)."""
    return torch.cuda.get_device_properties(index).multi_processor_count
