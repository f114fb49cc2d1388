"""Which GPU is free, busy or someone else's: nvidia-smi outputs as real nodes print them.

Pure logic (clusters.gpus); tests/unit/test_gpus.py covers the basic parse and policy cases,
these cover whole-node outputs, MIG and "[N/A]" fields, process attachment and the thresholds'
edges.  The fake nvidia-smi the ssh tests use prints the same format
(tests/harness/fakegpu.py): both are checked here against one parser.
"""

from __future__ import annotations

import pytest

from clusters import gpus
from tests.harness import fakegpu

# An 8x H100 SXM node (driver 550, `--format=csv,noheader,nounits`): 81559 MiB each, two
# GPUs held by one 2-GPU training job, one by a small notebook, one idle but hot.
H100_NODE = """\
0, GPU-9b2a1c6e-3f7d-4e58-a1b2-6c0d3e9f8a71, NVIDIA H100 80GB HBM3, 81559, 0, 0
1, GPU-4e7f0a2b-8c1d-4b3e-9f60-2a7d5c1e0b94, NVIDIA H100 80GB HBM3, 81559, 73421, 100
2, GPU-c5d83e19-0a6b-4f2c-8d71-e94b2a6c3f05, NVIDIA H100 80GB HBM3, 81559, 73421, 99
3, GPU-1a6e9d40-7b3c-4c85-b2f9-0d8e1c5a7b36, NVIDIA H100 80GB HBM3, 81559, 2301, 3
4, GPU-e83b7f21-5d9a-4a06-8c4e-3f1b6d0a92c8, NVIDIA H100 80GB HBM3, 81559, 1, 0
5, GPU-7f0c2d58-1e4b-4d93-a6f7-5b8e0c3d1a69, NVIDIA H100 80GB HBM3, 81559, 1, 64
6, GPU-2d9e5a07-c3f1-4b6d-9e28-7a4c1f0b5d83, NVIDIA H100 80GB HBM3, 81559, 1, 0
7, GPU-b61f4c93-2a8e-4f07-b5d3-9c0e7a2f4b16, NVIDIA H100 80GB HBM3, 81559, 1, 0
"""
H100_APPS = """\
GPU-4e7f0a2b-8c1d-4b3e-9f60-2a7d5c1e0b94, 1873342, 73412
GPU-c5d83e19-0a6b-4f2c-8d71-e94b2a6c3f05, 1873343, 73412
GPU-1a6e9d40-7b3c-4c85-b2f9-0d8e1c5a7b36, 2210051, 2292
"""

# A 4x A100 80GB PCIe node: GPU 2 busy with two processes of one user, GPU 3 in MIG mode
# (utilization reads "[N/A]" there, and its processes' memory too).
A100_NODE = """\
0, GPU-3f9c2a1e-7b4d-4c8e-9a2f-1d5e6b7c8a90, NVIDIA A100 80GB PCIe, 81920, 4, 0
1, GPU-5a1b9c3d-2e4f-4a6b-8c0d-1e2f3a4b5c6d, NVIDIA A100 80GB PCIe, 81920, 4, 0
2, GPU-8d2e4f6a-1b3c-4d5e-9f7a-0b1c2d3e4f5a, NVIDIA A100 80GB PCIe, 81920, 39811, 87
3, GPU-0e1f2a3b-4c5d-4e6f-8a9b-7c8d9e0f1a2b, NVIDIA A100 80GB PCIe, 81920, 13, [N/A]
"""
A100_APPS = """\
GPU-8d2e4f6a-1b3c-4d5e-9f7a-0b1c2d3e4f5a, 48213, 19900
GPU-8d2e4f6a-1b3c-4d5e-9f7a-0b1c2d3e4f5a, 48377, 19900
GPU-0e1f2a3b-4c5d-4e6f-8a9b-7c8d9e0f1a2b, 51002, [N/A]
"""

POLICY = gpus.GpuPolicy()  # the lab defaults: <= 1024 MiB used, <= 20 % utilization


def _node(query: str, apps: str) -> list[gpus.GpuState]:
    return gpus.merge(gpus.parse_query_gpu(query), gpus.parse_query_apps(apps))


def test_lab_default_thresholds():
    assert (POLICY.max_memory_used_mb, POLICY.max_utilization_pct) == (1024, 20)


def test_h100_node_every_row_parsed_with_its_identity():
    states = _node(H100_NODE, H100_APPS)
    assert [g.index for g in states] == list(range(8))
    assert {g.memory_total_mb for g in states} == {81559}
    assert {g.name for g in states} == {"NVIDIA H100 80GB HBM3"}
    assert states[1].uuid == "GPU-4e7f0a2b-8c1d-4b3e-9f60-2a7d5c1e0b94"
    assert len({g.uuid for g in states}) == 8
    assert states[1].processes == [gpus.GpuProcess(1873342, 73412)]
    assert states[2].processes == [gpus.GpuProcess(1873343, 73412)]
    assert states[3].processes == [gpus.GpuProcess(2210051, 2292)]
    assert all(states[i].processes == [] for i in (0, 4, 5, 6, 7))


def test_h100_node_classification():
    """Free: idle, under both thresholds, nobody's process; the hot idle GPU is not free."""
    states = _node(H100_NODE, H100_APPS)
    free = [g.index for g in states if gpus.is_free(g, POLICY)]
    assert free == [0, 4, 6, 7]
    assert states[5].utilization_pct == 64 and not gpus.is_free(states[5], POLICY)


def test_our_training_job_does_not_make_its_gpus_foreign_but_they_are_still_not_free():
    """A process of ours (a leased run) is not someone else's; memory and load still count."""
    states = _node(H100_NODE, H100_APPS)
    ours = [1873342, 1873343]
    assert not gpus.is_free(states[1], POLICY, our_pids=ours)  # 73 GB used, 100 %
    assert not gpus.is_free(states[3], POLICY, our_pids=ours)  # someone else's notebook
    idle_with_our_leftover = gpus.GpuState(
        4, states[4].uuid, states[4].name, 81559, 600, 0, [gpus.GpuProcess(1873342, 600)]
    )
    assert gpus.is_free(idle_with_our_leftover, POLICY, our_pids=ours)
    assert not gpus.is_free(idle_with_our_leftover, POLICY)  # unknown pid: foreign
    assert not gpus.is_free(states[0], POLICY, our_pids=ours, leased=True)


def test_a100_node_with_mig_and_na_fields():
    states = _node(A100_NODE, A100_APPS)
    assert [g.memory_total_mb for g in states] == [81920] * 4
    mig = states[3]
    assert (mig.memory_used_mb, mig.utilization_pct) == (13, 0)  # "[N/A]" utilization
    assert mig.processes == [gpus.GpuProcess(51002, 0)]  # "[N/A]" memory of a MIG process
    assert not gpus.is_free(mig, POLICY), "a process on a MIG GPU still makes it busy"
    two = states[2]
    assert [p.pid for p in two.processes] == [48213, 48377]
    assert not gpus.is_free(two, POLICY, our_pids=[48213]), "one of the two is not ours"
    assert [g.index for g in states if gpus.is_free(g, POLICY)] == [0, 1]


@pytest.mark.parametrize(
    ("used", "util", "free"),
    [
        (1024, 20, True),  # both limits are inclusive
        (1025, 0, False),
        (0, 21, False),
        (0, 0, True),
    ],
)
def test_thresholds_at_their_edges(used, util, free):
    gpu = gpus.GpuState(0, "GPU-edge", "NVIDIA A100-SXM4-80GB", 81920, used, util)
    assert gpus.is_free(gpu, POLICY) is free


def test_a_host_policy_override_applies():
    lax = gpus.GpuPolicy(max_memory_used_mb=40000, max_utilization_pct=90)
    [_, _, two, _] = gpus.parse_query_gpu(A100_NODE)
    assert not gpus.is_free(two, POLICY) and gpus.is_free(two, lax)


def test_processes_of_a_gpu_that_is_no_longer_listed_are_dropped():
    """A GPU gone from --query-gpu (fell off the bus) takes its process rows with it."""
    query = "".join(H100_NODE.splitlines(keepends=True)[:2])  # GPUs 0 and 1 only
    states = _node(query, H100_APPS)
    assert [g.index for g in states] == [0, 1]
    assert sum(len(g.processes) for g in states) == 1


def test_one_pid_on_two_gpus_is_listed_on_both():
    uuid_a, uuid_b = "GPU-11111111-0000-4000-8000-000000000001", "GPU-2222-0000-4000-8000-02"
    query = f"0, {uuid_a}, NVIDIA H100 80GB HBM3, 81559, 30000, 80\n"
    query += f"1, {uuid_b}, NVIDIA H100 80GB HBM3, 81559, 30000, 80\n"
    apps = gpus.parse_query_apps(f"{uuid_a}, 777, 29990\n{uuid_b}, 777, 29990\n")
    assert apps == {uuid_a: [gpus.GpuProcess(777, 29990)], uuid_b: [gpus.GpuProcess(777, 29990)]}
    assert [len(g.processes) for g in gpus.merge(gpus.parse_query_gpu(query), apps)] == [1, 1]


def test_blank_lines_and_padding_are_tolerated():
    text = "\n  0,  GPU-aaaa-1 ,  NVIDIA A100-SXM4-80GB , 81920 , 4 , 0  \n\n"
    [gpu] = gpus.parse_query_gpu(text)
    assert (gpu.uuid, gpu.name, gpu.memory_total_mb) == (
        "GPU-aaaa-1",
        "NVIDIA A100-SXM4-80GB",
        81920,
    )
    assert gpus.parse_query_gpu("") == [] and gpus.parse_query_apps("") == {}


@pytest.mark.parametrize(
    "text",
    [
        fakegpu.GARBAGE,
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver",
        "GPU-3f9c2a1e-7b4d-4c8e-9a2f-1d5e6b7c8a90, 48213",  # a column short
        "GPU-3f9c2a1e-7b4d-4c8e-9a2f-1d5e6b7c8a90, pid?, 40960",
        "3f9c2a1e-7b4d-4c8e-9a2f-1d5e6b7c8a90, 48213, 40960",  # not a GPU UUID
    ],
)
def test_garbage_from_the_apps_query_is_an_inventory_error(text):
    with pytest.raises(gpus.InventoryError):
        gpus.parse_query_apps(text + "\n")


@pytest.mark.parametrize(
    "text",
    [
        fakegpu.GARBAGE,
        # The compute-apps answer fed to the GPU parser (a wrong query) is not 3 GPUs.
        A100_APPS,
        "0, GPU-3f9c2a1e-7b4d-4c8e-9a2f-1d5e6b7c8a90, NVIDIA A100-SXM4-80GB, 81920, 4",
    ],
)
def test_garbage_from_the_gpu_query_is_an_inventory_error(text):
    with pytest.raises(gpus.InventoryError):
        gpus.parse_query_gpu(text)


def test_the_fake_nvidia_smi_prints_what_the_parser_reads():
    """tests/harness/fakegpu.py's rows parse to exactly the dicts the ssh tests wrote."""
    rows = fakegpu.gpu_rows(4, 3)
    rows[2] = {**rows[2], "used": 30000, "util": 55}
    apps = [{"uuid": rows[1]["uuid"], "pid": 48213, "used": 40960}]
    states = _node(fakegpu.format_gpus(rows), fakegpu.format_apps(apps))
    assert fakegpu.format_gpus(rows).splitlines()[0] == (
        f"0, {rows[0]['uuid']}, NVIDIA A100-SXM4-80GB, 81920, 4, 0"
    )
    assert [g.uuid for g in states] == [r["uuid"] for r in rows]
    assert len({r["uuid"] for r in fakegpu.gpu_rows(4, 1) + fakegpu.gpu_rows(4, 2)}) == 8
    assert states[1].processes == [gpus.GpuProcess(48213, 40960)]
    assert [g.index for g in states if gpus.is_free(g, POLICY)] == [0, 3]
