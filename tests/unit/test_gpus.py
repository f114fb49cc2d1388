"""Inventory parsing and the free-GPU policy (pure logic), against captured real outputs."""

import sys

import pytest

from clusters import gpus
from clusters.slurm import parse_sinfo

# Captured from a real H100 node (nvidia-smi 550): 81559 MiB total.
H100_QUERY = """0, GPU-5c1e3f0a-9d3b-7a45-1c2e-8f6b0d2a4c11, NVIDIA H100 80GB HBM3, 81559, 1, 0
1, GPU-a2b7d9e4-6c1f-4b3a-9e8d-2f5c7a1b3d90, NVIDIA H100 80GB HBM3, 81559, 40969, 97
"""
H100_APPS = "GPU-a2b7d9e4-6c1f-4b3a-9e8d-2f5c7a1b3d90, 48213, 40960\n"


def test_parses_real_h100_rows_and_attaches_processes():
    states = gpus.merge(gpus.parse_query_gpu(H100_QUERY), gpus.parse_query_apps(H100_APPS))
    assert [g.index for g in states] == [0, 1]
    assert states[0].memory_total_mb == 81559
    assert states[0].processes == []
    assert states[1].processes == [gpus.GpuProcess(pid=48213, used_memory_mb=40960)]
    assert states[1].utilization_pct == 97


def test_not_supported_fields_read_as_zero():
    [gpu] = gpus.parse_query_gpu("0, GPU-1, Tesla T4, 15360, [N/A], [Not Supported]\n")
    assert (gpu.memory_used_mb, gpu.utilization_pct) == (0, 0)


@pytest.mark.parametrize(
    "text",
    [
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver",
        "0, GPU-1, A100, lots, 1, 0",
        "0, not-a-uuid, A100, 1, 1, 0",
    ],
)
def test_garbage_is_an_inventory_error_not_a_busy_gpu(text):
    with pytest.raises(gpus.InventoryError):
        gpus.parse_query_gpu(text)


def test_no_running_processes_line_is_empty():
    assert gpus.parse_query_apps("No running processes found\n") == {}


def test_free_policy():
    policy = gpus.GpuPolicy(max_memory_used_mb=1024, max_utilization_pct=20)
    idle = gpus.GpuState(0, "GPU-a", "A100", 81920, 4, 0)
    assert gpus.is_free(idle, policy)
    assert not gpus.is_free(idle, policy, leased=True)
    hot = gpus.GpuState(1, "GPU-b", "A100", 81920, 4, 55)
    assert not gpus.is_free(hot, policy)
    full = gpus.GpuState(2, "GPU-c", "A100", 81920, 2048, 0)
    assert not gpus.is_free(full, policy)
    foreign = gpus.GpuState(3, "GPU-d", "A100", 81920, 500, 0, [gpus.GpuProcess(77, 500)])
    assert not gpus.is_free(foreign, policy)
    assert gpus.is_free(foreign, policy, our_pids=[77])


def test_sinfo_summary_counts_gpus_per_partition_and_each_node_once():
    """`sinfo -h -N -o %N|%P|%G|%T|%l`: a line per node and partition."""
    out = (
        "n1|gpu*|gpu:a100:4(S:0-1)|idle|2-00:00:00\n"
        "n2|gpu*|gpu:a100:4,gpu:v100:2|mixed|2-00:00:00\n"
        "n3|gpu*|gpu:8|drained*|2-00:00:00\n"
        "n1|debug|gpu:a100:4(S:0-1)|idle|30:00\n"
        "c1|cpu|(null)|allocated|infinite\n"
        "c2|cpu|(null)|down~|infinite\n"
    )
    facts = parse_sinfo(out)
    by_name = {p["name"]: p for p in facts["partitions"]}
    gpu = by_name["gpu"]
    assert gpu["gpus"] == 18 and gpu["default"] is True and gpu["nodes"] == 3
    assert gpu["max_gpus_per_node"] == 8 and gpu["max_time_minutes"] == 2880
    assert gpu["states"] == {"idle": 1, "mixed": 1, "drained": 1}
    assert by_name["debug"]["max_time_minutes"] == 30 and by_name["debug"]["default"] is False
    assert by_name["cpu"]["gpus"] == 0 and by_name["cpu"]["max_time_minutes"] is None
    # n1 sits in two partitions: the cluster has 5 nodes and 18 GPUs, not 22.
    assert (facts["nodes"], facts["gpus"]) == (5, 18)
    assert facts["node_states"] == {"idle": 1, "mixed": 1, "drained": 1, "allocated": 1, "down": 1}


@pytest.mark.django_db
def test_inventory_store_upserts_by_uuid_in_a_fixed_number_of_queries():
    """GIVEN a host's GPUs in the database WHEN a poll reports one of them changed, one new and
    one gone THEN rows follow by UUID (the gone one kept, not present), with the same number of
    queries for 2 GPUs as for 8."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from clusters.models import Gpu, Host
    from clusters.services import inventory_store
    from tests.factories import HostFactory

    def state(i: int, used: int = 4, procs: tuple = ()) -> gpus.GpuState:
        return gpus.GpuState(
            index=i,
            uuid=f"GPU-{i}",
            name="NVIDIA H100 80GB HBM3",
            memory_total_mb=81559,
            memory_used_mb=used,
            utilization_pct=0,
            processes=list(procs),
        )

    host = HostFactory()
    inventory_store(host=host, gpus=[state(0), state(1)], source="nvidia-smi")
    busy = state(0, used=40969, procs=(gpus.GpuProcess(pid=48213, used_memory_mb=40960),))
    with CaptureQueriesContext(connection) as two:
        inventory_store(
            host=host, gpus=[busy, state(2)], source="nvidia-smi", pid_runs={48213: "r1"}
        )
    rows = {g.uuid: g for g in Gpu.objects.filter(host=host)}
    assert rows["GPU-0"].memory_used_mb == 40969 and rows["GPU-0"].present
    assert rows["GPU-0"].processes == [{"pid": 48213, "used_memory_mb": 40960, "run_id": "r1"}]
    assert rows["GPU-2"].present and not rows["GPU-1"].present
    assert host.gpu_source == "nvidia-smi" and host.inventory_at is not None

    many = [state(i) for i in range(8)]
    inventory_store(host=host, gpus=many, source="nvidia-smi")
    many[5] = state(5, used=2048)
    with CaptureQueriesContext(connection) as eight:
        inventory_store(host=host, gpus=many, source="nvidia-smi")
    assert Gpu.objects.filter(host=host, present=True).count() == 8
    assert len(eight.captured_queries) <= len(two.captured_queries)

    # The same report again (an idle host, polled every few seconds): no GPU row is rewritten,
    # the host's inventory_at moves, and the API's updated_at follows it.
    from experiments.selectors import cluster_state

    before = {g.uuid: g.updated_at for g in Gpu.objects.filter(host=host)}
    last_read = Host.objects.get(pk=host.pk).inventory_at
    with CaptureQueriesContext(connection) as same:
        inventory_store(host=host, gpus=many, source="nvidia-smi")
    assert not [q for q in same.captured_queries if "CASE WHEN" in q["sql"]]  # no bulk_update
    assert {g.uuid: g.updated_at for g in Gpu.objects.filter(host=host)} == before
    host.refresh_from_db()
    assert host.inventory_at > last_read
    [row] = [h for h in cluster_state()["hosts"] if h["name"] == host.name]
    assert {g["updated_at"] for g in row["gpus"]} == {host.inventory_at}


class _FakeNvml:
    """Just enough of pynvml for read_nvml's memory choice (the gpu tier reads a real one)."""

    nvmlMemory_v2 = 0x02000028

    class NVMLError(Exception):
        pass

    def __init__(self, *, v2: bool) -> None:
        self.v2 = v2

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> object:
        from types import SimpleNamespace

        if version is None:  # v1: the driver's reserved 480 MiB counted as used
            return SimpleNamespace(total=81559 << 20, used=480 << 20)
        if not self.v2:
            raise self.NVMLError("Function Not Found")
        return SimpleNamespace(total=81559 << 20, reserved=480 << 20, used=0)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> object:
        from types import SimpleNamespace

        return SimpleNamespace(gpu=3)

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return "GPU-aa08b9ef-125a-bd24-51bc-6cdecbe36549"

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[object]:
        return []


@pytest.mark.parametrize(("v2", "used"), [(True, 0), (False, 480)])
def test_nvml_memory_is_read_as_nvidia_smi_counts_it_where_the_driver_can(monkeypatch, v2, used):
    """NVML's v2 memory call keeps the driver's reserved memory out of `used`, as nvidia-smi
    does; a driver without it falls back to v1 rather than failing the inventory."""
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(v2=v2))
    [gpu] = gpus.read_nvml()
    assert (gpu.memory_total_mb, gpu.memory_used_mb, gpu.utilization_pct) == (81559, used, 3)
    assert gpu.name == "NVIDIA H100 80GB HBM3"
