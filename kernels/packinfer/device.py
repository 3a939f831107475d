"""What the library asks of the device: its SM count, which the planners balance work over, its shared memory
per block, which bounds the tile shapes the planners may pick, and per SM, which bounds how many programs run at
once, and a host-to-device copy that does not wait."""

from __future__ import annotations

import functools

import torch

#: SMs assumed where the device is not a CUDA GPU (an H100 SXM's 132).
FALLBACK_SMS = 132
#: Shared memory per block assumed where there is no CUDA GPU (Hopper's 227 KiB, as the SM count above).
FALLBACK_SHARED_MEMORY = 232448
#: Shared memory per SM assumed likewise (Hopper's 228 KiB).
FALLBACK_SHARED_MEMORY_PER_SM = 233472


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


def shared_memory(device: torch.device | str | None = None) -> int:
    """Bytes of shared memory a kernel's block may use on the device (None: the current CUDA device);
    FALLBACK_SHARED_MEMORY where there is no CUDA GPU."""
    return _property(device, "shared_memory_per_block_optin", FALLBACK_SHARED_MEMORY)


def shared_memory_per_sm(device: torch.device | str | None = None) -> int:
    """Bytes of shared memory of one SM of the device (None: the current CUDA device), all blocks on it together;
    FALLBACK_SHARED_MEMORY_PER_SM where there is no CUDA GPU."""
    return _property(device, "shared_memory_per_multiprocessor", FALLBACK_SHARED_MEMORY_PER_SM)


def _property(device: torch.device | str | None, name: str, fallback: int) -> int:
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return fallback
    return _cuda_property(device.index if device.index is not None else torch.cuda.current_device(), name, fallback)


@functools.cache
def _cuda_property(index: int, name: str, fallback: int) -> int:
    """Asked once per GPU and property (the query costs host time); `fallback` where torch does not report it."""
    return int(getattr(torch.cuda.get_device_properties(index), name, fallback))


def upload(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on `device`, copied without making the host wait for queued GPU work: through pinned memory,
    non-blocking, on a CUDA device (a plain .to(cuda) from pageable memory synchronises the stream, which would
    stall a serving loop preparing the next iteration while the GPU runs this one); a plain copy elsewhere."""
    device = torch.device(device)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
