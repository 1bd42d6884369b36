from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from autocpu.hardware import ISA_FLAGS, cgroup_cpu_limit, probe, usable_cpus


def test_probe_matches_proc_cpuinfo_and_affinity():
    hw = probe()
    text = Path("/proc/cpuinfo").read_text()
    first = text.split("\n\n")[0]
    flags = set(
        next(line for line in first.splitlines() if line.startswith("flags")).split(":")[1].split()
    )
    assert set(hw.flags) == {f for f in ISA_FLAGS if f in flags}
    assert hw.logical_cores == text.count("processor\t:")
    assert hw.affinity_cpus == len(os.sched_getaffinity(0))
    assert 1 <= hw.usable_cpus <= hw.affinity_cpus
    assert hw.vendor in first and hw.brand in first
    assert hw.memory_bytes and hw.memory_bytes > 2**28
    assert hw.l3_bytes is None or hw.l3_bytes >= 2**20


def test_isa_capabilities_follow_flags():
    hw = probe()
    assert hw.native_bf16 == (hw.has("avx512_bf16") or hw.has("amx_bf16"))
    assert hw.fast_int8 == (hw.has("avx512_vnni") or hw.has("avx_vnni") or hw.has("amx_int8"))
    if "amx_tile" not in hw.flags:
        assert not hw.amx_granted


def test_fingerprint_is_stable_across_processes():
    code = "from autocpu.hardware import probe; print(probe().fingerprint())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == probe().fingerprint()
    assert len(probe().fingerprint()) == 16


def test_cgroup_quota_caps_usable_cpus(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_limit(v1) == 3.0
    assert usable_cpus(8, 1.5) == 1
    assert usable_cpus(2, 3.0) == 2
    assert usable_cpus(4, None) == 4
    assert usable_cpus(4, 0.2) == 1


def test_probe_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "autocpu.cli", "probe", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(out.stdout)
    assert data["fingerprint"] == probe().fingerprint()
    assert data["backends"]["eager"]["available"] is True
