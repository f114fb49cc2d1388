"""Why a GPU run exited non-zero, read from the end of its output: pure, so unit-tested on
real log text (PyTorch, the CUDA runtime and driver, JAX/XLA)."""

from __future__ import annotations

from enum import Enum


class Failure(Enum):
    CUDA_OOM = "cuda_oom"  # the run asked its GPU for more memory than it has: its own failure
    GPU_BUSY = "gpu_busy"  # its GPU was taken meanwhile (exclusive mode): contention, requeue
    EXIT_CODE = "exit_code"  # anything else: the command's own failure


OOM_MARKERS = (
    b"CUDA out of memory",  # torch: "torch.OutOfMemoryError: CUDA out of memory. Tried to ..."
    b"torch.OutOfMemoryError",
    b"CUDA_ERROR_OUT_OF_MEMORY",  # the driver API (also JAX's "CUDA_ERROR_OUT_OF_MEMORY: ...")
    b"CUDA error: out of memory",  # the runtime API's cudaErrorMemoryAllocation
    b"RESOURCE_EXHAUSTED: Out of memory",  # XLA (JAX, TensorFlow)
)
BUSY_MARKERS = (
    b"all CUDA-capable devices are busy or unavailable",
    b"CUDA_ERROR_DEVICE_UNAVAILABLE",
)


def classify_failure(tail: bytes) -> Failure:
    """A real out-of-memory wins over "busy": a run that got its GPU and then ran out of
    memory on it was not a victim of contention."""
    if any(marker in tail for marker in OOM_MARKERS):
        return Failure.CUDA_OOM
    if any(marker in tail for marker in BUSY_MARKERS):
        return Failure.GPU_BUSY
    return Failure.EXIT_CODE
