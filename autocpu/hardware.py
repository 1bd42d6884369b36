"""Hardware probe: what this CPU can do for this process.

Reads /proc/cpuinfo and sysfs directly (a few ms); py-cpuinfo is only a fallback because it
sleeps ~1 s per call to measure the clock and knows nothing about AMX.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autocpu.hashing import stable_hash

#: ISA features autocpu cares about, in the spelling of Linux's /proc/cpuinfo flags.
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)

_SYSFS_CPU = Path("/sys/devices/system/cpu")
_SYSFS_NODE = Path("/sys/devices/system/node")
_ARCH_REQ_XCOMP_PERM = 0x1023
_ARCH_GET_XCOMP_PERM = 0x1022
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86-64 syscall number


@dataclass(frozen=True)
class CpuInfo:
    """What the probe found. Fields that drive performance feed :meth:`fingerprint`."""

    vendor: str
    brand: str
    family: int | None
    model: int | None
    stepping: int | None
    arch: str
    logical_cores: int
    physical_cores: int
    usable_cpus: int
    affinity_cpus: int
    cgroup_cpu_limit: float | None
    sockets: int
    numa_nodes: int
    l2_bytes: int | None
    l3_bytes: int | None
    memory_bytes: int | None
    flags: tuple[str, ...]
    amx_granted: bool
    source: str = "procfs"
    extra: dict[str, str] = field(default_factory=dict)

    def has(self, *names: str) -> bool:
        """True when every named ISA feature is present (AMX also needs the OS grant)."""
        for name in names:
            if name not in self.flags:
                return False
            if name.startswith("amx") and not self.amx_granted:
                return False
        return True

    @property
    def native_bf16(self) -> bool:
        """bf16 math runs in hardware; without it bf16 is ~2x slower than fp32."""
        return self.has("avx512_bf16") or self.has("amx_bf16")

    @property
    def fast_int8(self) -> bool:
        """int8 dot-product instructions (VNNI or AMX) make dynamic int8 pay off."""
        return self.has("avx512_vnni") or self.has("avx_vnni") or self.has("amx_int8")

    def fingerprint(self) -> str:
        """Stable hash of what changes performance (never clock readings or load)."""
        key = {
            "vendor": self.vendor,
            "brand": self.brand,
            "family": self.family,
            "model": self.model,
            "stepping": self.stepping,
            "arch": self.arch,
            "usable_cpus": self.usable_cpus,
            "sockets": self.sockets,
            "numa_nodes": self.numa_nodes,
            "l2": self.l2_bytes,
            "l3": self.l3_bytes,
            "flags": sorted(self.flags),
            "amx_granted": self.amx_granted,
        }
        return stable_hash(key)

    def family_key(self) -> str:
        """Coarser than the fingerprint (vendor, family, model, ISA set): plans made on another
        machine of this key are good search seeds, not guaranteed winners."""
        return stable_hash([self.vendor, self.family, self.model, sorted(self.flags)])

    def to_dict(self) -> dict:
        data = asdict(self)
        data["flags"] = list(self.flags)
        data["fingerprint"] = self.fingerprint()
        data["family_key"] = self.family_key()
        data["native_bf16"] = self.native_bf16
        data["fast_int8"] = self.fast_int8
        return data


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _parse_size(text: str | None) -> int | None:
    """Parse sysfs cache sizes such as '2048K' or '32M'."""
    if not text:
        return None
    match = re.fullmatch(r"(\d+)([KMG]?)", text.strip())
    if not match:
        return None
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2)]
    return int(match.group(1)) * scale


def _cpuinfo_records(text: str) -> list[dict[str, str]]:
    records: list[dict[str, str]] = []
    for block in text.strip().split("\n\n"):
        record: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                record[key.strip()] = value.strip()
        if record:
            records.append(record)
    return records


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value, 0) if value is not None else None
    except ValueError:
        return None


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota (v2 cpu.max, then v1 cfs files); None if unlimited."""
    cpu_max = _read(root / "cpu.max")
    if cpu_max:
        quota, _, period = cpu_max.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota = _int_or_none(_read(root / "cpu" / "cpu.cfs_quota_us"))
    period = _int_or_none(_read(root / "cpu" / "cpu.cfs_period_us"))
    if quota and period and quota > 0:
        return quota / period
    return None


def _affinity_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def usable_cpus(affinity: int, quota: float | None) -> int:
    """CPUs this process can keep busy: its affinity, capped by the cgroup quota rounded down
    (as Go's automaxprocs does: more threads than the quota get throttled mid-inference)."""
    if quota is None:
        return max(affinity, 1)
    return max(1, min(affinity, math.floor(quota)))


def _topology(cpus: list[int]) -> tuple[int, int]:
    """(physical cores, sockets) among all online CPUs, from sysfs topology."""
    cores: set[tuple[str, str]] = set()
    sockets: set[str] = set()
    for cpu in cpus:
        topo = _SYSFS_CPU / f"cpu{cpu}" / "topology"
        package = _read(topo / "physical_package_id") or "0"
        core = _read(topo / "core_id") or str(cpu)
        cores.add((package, core))
        sockets.add(package)
    return max(len(cores), 1), max(len(sockets), 1)


def _cache_sizes(cpu: int) -> tuple[int | None, int | None]:
    l2 = l3 = None
    for index in sorted((_SYSFS_CPU / f"cpu{cpu}" / "cache").glob("index*")):
        level = _read(index / "level")
        kind = _read(index / "type")
        if kind == "Instruction":
            continue
        size = _parse_size(_read(index / "size"))
        if level == "2":
            l2 = size
        elif level == "3":
            l3 = size
    return l2, l3


def _numa_nodes() -> int:
    nodes = list(_SYSFS_NODE.glob("node[0-9]*"))
    return max(len(nodes), 1)


def _memory_bytes() -> int | None:
    text = _read(Path("/proc/meminfo"))
    match = re.search(r"MemTotal:\s+(\d+) kB", text or "")
    return int(match.group(1)) * 1024 if match else None


def _amx_granted(flags: set[str]) -> bool:
    """Ask Linux for AMX tile data permission; flags alone do not let a process use AMX."""
    if "amx_tile" not in flags or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
        mask = ctypes.c_uint64(0)
        if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
            return False
        return bool(mask.value & (1 << _XFEATURE_XTILEDATA))
    except (OSError, AttributeError):
        return False


def _from_procfs(text: str) -> CpuInfo:
    records = _cpuinfo_records(text)
    first = records[0]
    flags = set(first.get("flags", "").split())
    online = [int(r["processor"]) for r in records if "processor" in r]
    physical, sockets = _topology(online)
    affinity = _affinity_cpus()
    limit = cgroup_cpu_limit()
    usable = usable_cpus(len(affinity), limit)
    l2, l3 = _cache_sizes(affinity[0] if affinity else 0)
    return CpuInfo(
        vendor=first.get("vendor_id", "unknown"),
        brand=first.get("model name", "unknown"),
        family=_int_or_none(first.get("cpu family")),
        model=_int_or_none(first.get("model")),
        stepping=_int_or_none(first.get("stepping")),
        arch=platform.machine(),
        logical_cores=len(online),
        physical_cores=physical,
        usable_cpus=usable,
        affinity_cpus=len(affinity),
        cgroup_cpu_limit=limit,
        sockets=sockets,
        numa_nodes=_numa_nodes(),
        l2_bytes=l2,
        l3_bytes=l3,
        memory_bytes=_memory_bytes(),
        flags=tuple(f for f in ISA_FLAGS if f in flags),
        amx_granted=_amx_granted(flags),
    )


def _from_py_cpuinfo() -> CpuInfo:
    """Fallback for systems without /proc/cpuinfo (macOS, some containers)."""
    import cpuinfo  # py-cpuinfo, slow: only here

    info = cpuinfo.get_cpu_info()
    raw_flags = set(info.get("flags", []))
    aliases = {"avx512vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16"}
    flags = {aliases.get(f, f) for f in raw_flags}
    count = os.cpu_count() or 1
    affinity = _affinity_cpus()
    return CpuInfo(
        vendor=info.get("vendor_id_raw", "unknown"),
        brand=info.get("brand_raw", "unknown"),
        family=info.get("family"),
        model=info.get("model"),
        stepping=info.get("stepping"),
        arch=platform.machine(),
        logical_cores=count,
        physical_cores=count,
        usable_cpus=len(affinity),
        affinity_cpus=len(affinity),
        cgroup_cpu_limit=None,
        sockets=1,
        numa_nodes=1,
        l2_bytes=info.get("l2_cache_size"),
        l3_bytes=info.get("l3_cache_size"),
        memory_bytes=None,
        flags=tuple(f for f in ISA_FLAGS if f in flags),
        amx_granted=False,
        source="py-cpuinfo",
    )


@functools.lru_cache(maxsize=1)
def probe() -> CpuInfo:
    """Probe the CPU once per process (the answer does not change while it runs)."""
    text = _read(Path("/proc/cpuinfo"))
    if text and "flags" in text:
        return _from_procfs(text)
    return _from_py_cpuinfo()
