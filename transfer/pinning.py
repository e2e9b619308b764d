"""Exact pinning of the host tier: plain pages, registered with CUDA, handed back when freed.

``torch.empty(..., pin_memory=True)`` goes through torch's caching host allocator, which rounds a
block up to a power of two (103 GB of KV pins 172 GB) and keeps freed blocks for reuse. The host
tier instead maps exactly the bytes it needs (anonymous private pages, untouched until written)
and pins them with ``cudaHostRegister``. The tensor owns the mapping: when its storage is freed
(the last view gone), the pages are unregistered and unmapped, so the memory goes back to the
system at once.

Before mapping anything, :func:`check_pinnable` refuses a tier larger than the memory this machine
has available, with an error that says how much is needed and what to change.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
from collections.abc import Callable

import psutil
import torch

from omnikv_runtime.errors import PromptError

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_pinned_bytes = 0  # bytes registered by this module and not yet released


def pinned_bytes() -> int:
    """Bytes of host memory this process has pinned for host tiers and not yet freed."""
    return _pinned_bytes


def pinnable_bytes() -> int:
    """Host memory a new pinned tier may take now: what the system reports available."""
    return psutil.virtual_memory().available


def check_pinnable(nbytes: int, what: str = "the host tier") -> None:
    """Raise PromptError, before anything is allocated, when ``nbytes`` cannot be pinned here."""
    available = pinnable_bytes()
    if nbytes <= available:
        return
    raise PromptError(
        f"{what} needs {nbytes / 1e9:.2f} GB of host memory but {available / 1e9:.2f} GB are "
        "available on this machine. To fit: shorten the prompt or lower max_new_tokens or the batch; "
        "set offload.host_dtype = 'float8_e4m3fn' (about half the bytes per token); use more filter or "
        "wait layers (fewer sparse layers); or free host memory (other processes, earlier caches). "
        "`omnikv plan` gives the longest context that fits."
    )


# cudaHostRegisterPortable | cudaHostRegisterMapped: pinned for every context, and mapped into the
# device's address space (kernels read it through UVA; Triton resolves the device address)
_REGISTER_FLAGS = 0x01 | 0x02


def _cudart_register() -> tuple[Callable[[int, int], int], Callable[[int], int]]:
    """(register(ptr, nbytes) -> CUDA error code, unregister(ptr) -> code) from torch's cudart."""
    cudart = torch.cuda.cudart()

    def register(pointer: int, size: int) -> int:
        status = int(cudart.cudaHostRegister(pointer, size, _REGISTER_FLAGS))
        if status != 0:
            _clear_last_cuda_error()
        return status

    return register, lambda pointer: int(cudart.cudaHostUnregister(pointer))


def _clear_last_cuda_error() -> None:
    """Reset the thread's last CUDA runtime error after a failed registration, which torch's next kernel
    launch check would otherwise report as its own (best effort: through the loaded libcudart)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()
    except (OSError, AttributeError) as exc:
        logger.debug("could not reset the last CUDA error: %s", exc)


def _mapped_pages(nbytes: int, register: Callable[[int, int], int], unregister: Callable[[int], int]):
    """A writable ctypes array over ``nbytes`` fresh anonymous pages, registered with ``register``
    (the code is in ``.status``). Dropping the last reference unregisters, then unmaps."""
    global _pinned_bytes
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            pages.madvise(mmap.MADV_HUGEPAGE)  # fewer pages to fault in and pin
        except OSError:
            pass

    class Pages(ctypes.c_uint8 * nbytes):
        status = -1

        def __del__(self) -> None:
            global _pinned_bytes
            if self.status != 0:
                return
            try:
                unregister(ctypes.addressof(self))
                with _lock:
                    _pinned_bytes -= nbytes
            except Exception:  # interpreter shutdown: CUDA and this module may already be gone
                pass
            # the mapping is unmapped right after: this array held its only other reference

    array = Pages.from_buffer(pages)
    array.status = register(ctypes.addressof(array), nbytes)
    if array.status == 0:
        with _lock:
            _pinned_bytes += nbytes
    return array


def allocate_pinned(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    register: Callable[[int, int], int] | None = None,
    unregister: Callable[[int], int] | None = None,
) -> tuple[torch.Tensor, int]:
    """A host tensor of exactly ``shape`` x ``dtype`` bytes, pinned with ``cudaHostRegister``.

    Returns ``(tensor, status)``: status 0 when pinned, else the CUDA error code (the tensor is then
    ordinary pageable memory, still usable). ``register``/``unregister`` replace torch's cudart
    (tests). Raises PromptError before mapping anything when the bytes are not available.
    """
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype), 0
    check_pinnable(nbytes)
    if register is None or unregister is None:
        register, unregister = _cudart_register()
    array = _mapped_pages(nbytes, register, unregister)
    status = array.status
    tensor = torch.frombuffer(array, dtype=torch.uint8, count=nbytes)  # holds the array until freed
    return tensor.view(dtype).view(shape), status
