"""The machine parity rows and acceptance checks record: CPU model, the flags that pick kernels, GPU, versions."""

from __future__ import annotations

import onnxruntime

from mrl.runtime.machine import KERNEL_FLAGS, Machine, cpuid_features, kernel_flags, parse_cpuinfo, this_machine

CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 avx_vnni
processor\t: 1
model name\t: something else
flags\t\t: fpu
"""
XEON = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni"}


def test_cpuinfo_gives_the_first_processors_model_and_flags():
    model, flags = parse_cpuinfo(CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert flags >= XEON and "fpu" in flags
    assert parse_cpuinfo("") == ("", set())


def test_flags_where_cpuid_agrees_with_cpuinfo():
    cpuid = {"AVX2": True, "AVX512F": True, "AVX512VNNI": True, "AVX512BF16": True}
    flags, note = kernel_flags(XEON, cpuid)
    assert flags == KERNEL_FLAGS and note == ""
    assert kernel_flags({"avx2", "fma"}, {"AVX2": True, "AVX512F": False}) == (("avx2",), "")
    assert kernel_flags({"avx2", "amx_int8"}, None) == (("avx2", "amx_int8"), "")  # no CPUID probe: trust cpuinfo
    older_numpy = {"AVX2": True, "AVX512F": True, "AVX512VNNI": True}  # numpy 1.x knows no AVX512BF16
    assert kernel_flags(XEON, older_numpy) == (KERNEL_FLAGS, "")


def test_under_an_emulator_cpuid_wins_and_unconfirmable_flags_are_dropped():
    """qemu-x86_64 -cpu Haswell on a Xeon: /proc/cpuinfo is the host's, CPUID the emulated Haswell's."""
    flags, note = kernel_flags(XEON, {"AVX2": True, "AVX512F": False, "AVX512VNNI": False, "AVX512BF16": False})
    assert flags == ("avx2",)
    assert "CPUID disagrees with /proc/cpuinfo on avx512_bf16, avx512_vnni, avx512f" in note


def test_this_machine_as_this_process_sees_it():
    machine = this_machine()
    assert machine.cpu and set(machine.cpu_flags) <= set(KERNEL_FLAGS)
    cpuid = cpuid_features()
    if cpuid is not None:
        assert ("avx2" in machine.cpu_flags) == bool(cpuid["AVX2"])
        assert ("avx512f" in machine.cpu_flags) == bool(cpuid["AVX512F"])
    assert machine.onnxruntime == onnxruntime.__version__
    text = str(machine)
    assert text.startswith(f"CPU {machine.cpu} (") and f"onnxruntime {onnxruntime.__version__}" in text


def test_a_machine_reads_as_one_line():
    gpu = "NVIDIA H200 (sm_90)"
    machine = Machine(cpu="AMD EPYC", cpu_flags=("avx2",), gpu=gpu, onnxruntime="1.32.0", tensorrt="10.9")
    assert str(machine) == "CPU AMD EPYC (avx2), GPU NVIDIA H200 (sm_90), onnxruntime 1.32.0, TensorRT 10.9"
    bare = Machine(cpu="x", cpu_flags=())
    assert str(bare) == f"CPU x (none of {' '.join(KERNEL_FLAGS)}), no GPU"
