"""Environment parsing, memory readings, and the rule that mrl.bench imports without torch."""

import subprocess
import sys

import pytest

from mrl.bench import env, memory

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu avx2 avx512f avx512_vnni amx_int8 amx_bf16
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8488C
"""


def test_parse_cpuinfo():
    info = env.parse_cpuinfo(CPUINFO)
    assert info == {
        "model": "Intel(R) Xeon(R) Platinum 8488C",
        "flags": ["avx2", "avx512f", "avx512_vnni", "amx_bf16", "amx_int8"],
    }


def test_parse_nvidia_smi():
    header = "| NVIDIA-SMI 580.65   Driver Version: 580.65   CUDA Version: 13.0 |"
    gpus = env.parse_nvidia_smi("NVIDIA H100 80GB HBM3, 580.65, 81559 MiB\n", header)
    assert gpus == [
        {"name": "NVIDIA H100 80GB HBM3", "driver": "580.65", "memory": "81559 MiB", "cuda_driver_api": "13.0"}
    ]
    assert env.parse_nvidia_smi("") == []


def test_package_versions_without_importing():
    versions = env.package_versions(("numpy", "surely-not-installed-package"))
    assert versions["numpy"] and versions["surely-not-installed-package"] is None


def test_artifact_info_hashes_the_manifest(tiny_artifact):
    from mrl.runtime.manifest import sha256_file

    info = env.artifact_info(tiny_artifact)
    assert info["manifest_sha256"] == sha256_file(tiny_artifact / "manifest.json")
    assert env.artifact_info(None) is None


def test_memory_readings():
    text = "Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n"
    assert memory.parse_status_kib(text, "VmHWM") == 204800
    assert memory.parse_status_kib(text, "VmSwap") is None
    rss = memory.rss_mib()
    if rss is not None:  # Linux
        memory.reset_peak_rss()
        assert memory.peak_rss_mib() >= rss * 0.5


def test_bench_imports_without_torch():
    code = (
        "import sys; import mrl.bench.cli, mrl.bench.engine, mrl.bench.tradeoff, mrl.bench.serve, "
        "mrl.bench.runners, mrl.bench.plot; "
        "assert 'torch' not in sys.modules and 'sentence_transformers' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_other_load_subtracts_our_own_cpu_time():
    busy, total = memory.parse_proc_stat("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n", ticks_per_s=100)
    assert (busy, total) == (1.5, 10.0)
    before = memory.CpuSnapshot(busy_s=10.0, total_s=100.0, own_s=5.0)
    # 2 cores for 10 s of wall time (20 CPU-seconds): 16 busy, 12 of them ours -> others used 0.4 cores.
    after = memory.CpuSnapshot(busy_s=26.0, total_s=120.0, own_s=17.0)
    assert memory.other_load(before, after, cores=2) == pytest.approx(0.4)
    assert memory.other_load(None, after, cores=2) is None
    assert memory.cpu_snapshot() is None or memory.cpu_snapshot().total_s > 0


def test_busy_note_warns_about_skewed_rows():
    from mrl.bench.engine import busy_note

    assert busy_note([{"other_load_cores": 0.1}, {"other_load_cores": None}]) == ""
    assert "1 of 2 rows" in busy_note([{"other_load_cores": 0.9}, {"other_load_cores": 0.0}])


def test_cpu_of_a_partner_process_counts_as_ours():
    stat = "4242 (mrl serve (x)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0"
    assert memory.parse_pid_cpu_s(stat, ticks_per_s=100) == 3.0
    import os

    alone, with_self = memory.cpu_snapshot(), memory.cpu_snapshot((os.getpid(),))
    if alone is not None:
        assert with_self.own_s > alone.own_s  # our own pid's CPU counted twice: it was read
