"""Why a GPU run failed, from the end of its log: OOM is the run's own failure, "busy" is
contention (requeued), anything else is its exit code (issue 10: pure logic, real log text)."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.runner.classify import Failure, classify_failure

LOGS = Path(__file__).parent / "fixtures" / "logs"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("torch_oom.log", Failure.CUDA_OOM),
        ("tqdm_then_old_oom.log", Failure.CUDA_OOM),
        ("jax_oom.log", Failure.CUDA_OOM),
        ("torch_busy.log", Failure.GPU_BUSY),
        ("tqdm_failure.log", Failure.EXIT_CODE),
        ("host_memoryerror.log", Failure.EXIT_CODE),
    ],
)
def test_real_logs(name: str, expected: Failure) -> None:
    assert classify_failure((LOGS / name).read_bytes()) is expected


def test_an_oom_after_the_gpu_was_got_is_not_contention() -> None:
    """A run that once saw "busy" (a retry inside the script) and then ran out of memory on
    the GPU it got failed by itself: requeueing it would only fail it again."""
    tail = (LOGS / "torch_busy.log").read_bytes() + (LOGS / "torch_oom.log").read_bytes()
    assert classify_failure(tail) is Failure.CUDA_OOM


def test_markers_cut_by_a_carriage_return_progress_bar_still_count() -> None:
    """tqdm rewrites its line with \\r: the error text that follows it on the same "line"
    is still in the bytes the classifier reads."""
    tail = b" 12%|#2        | 12/100 [00:03<00:22]\rRuntimeError: CUDA error: out of memory\n"
    assert classify_failure(tail) is Failure.CUDA_OOM
    assert classify_failure(b"") is Failure.EXIT_CODE
