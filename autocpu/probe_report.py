"""What ``autocpu probe`` shows: the machine, which backends can run here, and hints."""

from __future__ import annotations

from rich.table import Table

from autocpu.backends import Availability
from autocpu.hardware import CpuInfo


def machine_tables(hw: CpuInfo, backends: dict[str, Availability]) -> list[Table]:
    """The CPU's properties, then each backend's availability with the fix when it has none."""
    table = Table(title=f"{hw.brand} ({hw.vendor}, family {hw.family} model {hw.model})")
    table.add_column("property")
    table.add_column("value", overflow="fold")
    limit = f", cgroup limit {hw.cgroup_cpu_limit:g}" if hw.cgroup_cpu_limit else ""
    rows = [
        (
            "cores",
            f"{hw.logical_cores} logical, {hw.physical_cores} physical, "
            f"{hw.sockets} socket(s), {hw.numa_nodes} NUMA node(s)",
        ),
        ("usable by this process", f"{hw.usable_cpus} (affinity {hw.affinity_cpus}{limit})"),
        ("L2 / L3", f"{_mib(hw.l2_bytes)} / {_mib(hw.l3_bytes)}"),
        ("memory", _mib(hw.memory_bytes)),
        ("ISA", " ".join(hw.flags) or "-"),
        ("AMX granted by the OS", "yes" if hw.amx_granted else "no"),
        ("native bf16 / fast int8", f"{_yes(hw.native_bf16)} / {_yes(hw.fast_int8)}"),
        ("fingerprint", hw.fingerprint()),
    ]
    for name, value in rows:
        table.add_row(name, value)
    backend_table = Table(title="backends")
    for column in ("backend", "available", "why not / fix"):
        backend_table.add_column(column, overflow="fold")
    for name, available in backends.items():
        fix = f"{available.reason}; fix: {available.fix}" if available.fix else available.reason
        backend_table.add_row(name, _yes(available.ok), fix)
    return [table, backend_table]


def hints(hw: CpuInfo, backends: dict[str, Availability]) -> list[str]:
    """What would likely speed this machine up that is not installed or not used."""
    hints = []
    for name in ("onnxruntime", "openvino"):
        if name in backends and not backends[name].ok and backends[name].fix:
            hints.append(f"{name} is usually the fastest fp32 engine on CPU: {backends[name].fix}")
    precisions = ["fp32"]
    if hw.native_bf16:
        precisions.append("bf16")
    if hw.fast_int8:
        precisions.append("int8 (VNNI/AMX)")
    hints.append(
        f"this CPU runs {', '.join(precisions)} natively; a looser --tolerance (bf16, int8) "
        "lets the search use them"
    )
    return hints


def _mib(value: int | None) -> str:
    return f"{value / 2**20:.0f} MiB" if value else "?"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
