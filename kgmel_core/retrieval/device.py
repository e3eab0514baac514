"""Where torch work runs (`auto`: CUDA when torch sees a GPU, else the CPU), in what precision its
matrix products run (training steps and the frozen encoders each have a `precision` setting), and how
inference batches share a CPU's cores (`in_cpu_lanes`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

# On a CPU, two batches in flight, each on half the cores, beat one batch on all of them: one thread's
# Python between operators and its small matrix products' synchronisation overlap the other's
# arithmetic. The results are the same bits: a batch's numbers do not depend on its thread count.
CPU_LANES = 2


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def has_native_bf16(device: str) -> bool:
    """True where bf16 matrix products run in hardware: a CUDA GPU with bf16, or a CPU whose oneDNN
    kernels multiply bf16 – AMX tiles (Intel Sapphire Rapids on), or AVX512-BF16's dot products (AMD
    Zen 4, Intel Cooper Lake). Elsewhere bf16 is emulated and slower than fp32."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # Private probes in torch 2.x: an absent one counts as no such hardware.
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return device == "cpu" and any(probe is not None and bool(probe()) for probe in probes)


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype for a `precision` setting, None for plain fp32. `auto` is bf16 only where
    the hardware has it natively, so a machine without it is never slowed down."""
    if precision == "bf16" or (precision == "auto" and has_native_bf16(device)):
        return torch.bfloat16
    return None


def resolved_precision(precision: str, device: str) -> str:
    """`fp32` or `bf16`: what `precision` means on this device, for artifact keys and manifests."""
    return "bf16" if autocast_dtype(precision, device) is not None else "fp32"


@contextlib.contextmanager
def autocast(precision: str, device: str) -> Iterator[None]:
    """torch.autocast for a `precision` setting: bf16 where it resolves to bf16, a no-op for fp32."""
    dtype = autocast_dtype(precision, device)
    with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
        yield


@contextlib.contextmanager
def inference(precision: str, device: str) -> Iterator[None]:
    """Forward passes without gradients under `autocast`, entered once around a run of batches: under
    `torch.no_grad` autocast keeps its bf16 copy of each weight until the context exits, while under
    `torch.inference_mode` it caches nothing and casts every weight again before each batch."""
    with torch.no_grad(), autocast(precision, device):
        yield


def cpu_lanes(device: str) -> int:
    """How many batches `in_cpu_lanes` keeps in flight on `device`: a caller with less work than that
    many batches splits it into smaller ones, or one lane would idle."""
    return CPU_LANES if device == "cpu" and torch.get_num_threads() >= CPU_LANES else 1


def in_cpu_lanes(device: str, batches: Sequence[T], work: Callable[[Sequence[T]], None]) -> None:
    """`work(batches)`; on a CPU with torch threads to share, as `CPU_LANES` threads, each doing every
    `CPU_LANES`-th batch on its share of the cores.

    `work` must enter `inference` itself (gradient and autocast modes are per thread) and must not call
    a fast tokenizer from two lanes at once. A lane's error is raised here after both lanes stop.
    """
    threads = torch.get_num_threads()
    lanes = cpu_lanes(device) if len(batches) > 1 else 1
    if lanes == 1:
        work(batches)
        return

    def lane(share: Sequence[T]) -> None:
        torch.set_num_threads(threads // lanes)
        work(share)

    try:
        with ThreadPoolExecutor(lanes) as pool:
            list(pool.map(lane, [batches[at::lanes] for at in range(lanes)]))
    finally:
        torch.set_num_threads(threads)  # threads started later copy the last setting: restore it
