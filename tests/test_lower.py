"""fsagen.lower's target handling: fsagen's own [target] keys (embed_ptx, the shared memory limit),
the fatbin reader and the shared memory reader; the real compiles use the tiny fixture programs."""
import struct
import sys
from pathlib import Path

import pytest

from fsagen import lower
from fsagen.errors import ScheduleError

TESTS = Path(__file__).resolve().parent


def _fatbin(entries):
    """A fatbin container as nvcc writes it (the fields fatbin_entries reads), around junk bytes."""
    body = b""
    for kind, arch, payload in entries:
        header = struct.pack("<HHIQ", kind, 0x101, 64, len(payload)) + bytes(12) + struct.pack("<I", arch)
        body += header + bytes(64 - len(header)) + payload
    return b"junk" + struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body + b"tail"


def test_fatbin_entries_reads_kinds_and_arches(tmp_path):
    lib = tmp_path / "x.so"
    lib.write_bytes(_fatbin([(1, 80, b"ptx text"), (2, 80, b"\x7fELF..."), (2, 86, b"elf")]) * 2)
    assert lower.fatbin_entries(lib) == [("ptx", 80), ("sass", 80), ("sass", 86)] * 2
    lib.write_bytes(b"no container here")
    assert lower.fatbin_entries(lib) == []


HOST = """
  (((TVMFFIAny*)stack_ffi_any)[0].v_int64) = ((int64_t)7);
  if (TVMFFIFunctionCall(__tvm_set_device_packed, (TVMFFIAny*) stack_ffi_any, 1, &result_1) != 0) {
  (((TVMFFIAny*)stack_ffi_any)[2].v_int64) = ((int64_t)128);
  (((TVMFFIAny*)stack_ffi_any)[3].v_int64) = ((int64_t)24832);
  if (TVMFFIFunctionCall(main_kernel_packed, (TVMFFIAny*) stack_ffi_any, 4, &result_2) != 0) {
"""
KERNEL = "extern \"C\" __global__ void __launch_bounds__(128, 1) main_kernel(float* A) {\n  extern __shared__ uchar buf_dyn_shmem[];"


def test_dynamic_shared_memory_reads_the_last_launch_argument():
    assert lower.dynamic_shared_memory(HOST, KERNEL) == {"main_kernel": 24832}
    assert lower.dynamic_shared_memory(HOST, KERNEL.replace("extern __shared__", "__shared__")) == {}
    with pytest.raises(RuntimeError, match="shared memory size of the launch of 'main_kernel'"):
        lower.dynamic_shared_memory(HOST.replace("[3]", "[9]"), KERNEL)


def test_tilelang_target_embed_ptx():
    pytest.importorskip("tilelang")
    from tilelang.transform import PassConfigKey

    plain = {"kind": "cuda", "arch": "sm_90a"}
    assert lower.tilelang_target(plain) == (plain, {})
    target, configs = lower.tilelang_target({"kind": "cuda", "arch": "sm_80", "embed_ptx": True})
    assert target == {"kind": "cuda", "arch": "sm_80", "code": ["sm_80", "sm_80"]}  # two codes: a fatbin
    assert configs == {PassConfigKey.TL_DEVICE_COMPILE_FLAGS: ["-gencode", "arch=compute_80,code=compute_80"]}
    target, _ = lower.tilelang_target({"kind": "cuda", "arch": "sm_80", "code": ["sm_80", "sm_86"], "embed_ptx": True})
    assert target["code"] == ["sm_80", "sm_86"]


@pytest.fixture
def fixtures(monkeypatch):
    pytest.importorskip("tilelang")
    monkeypatch.syspath_prepend(str(TESTS))
    import fixture_programs

    return sys.modules["fixture_programs"] if "fixture_programs" in sys.modules else fixture_programs


SM80 = {"kind": "cuda", "arch": "sm_80", "embed_ptx": True}


def test_embed_ptx_compiles_sass_and_ptx(fixtures, tmp_path):
    stages = lower.compile_programs({"main": fixtures.axpy()}, SM80, tmp_path)
    assert sorted(lower.fatbin_entries(tmp_path / stages["main"]["library"])) == [("ptx", 80), ("sass", 80)]
    assert stages["main"]["shared_memory_bytes"] == {}  # axpy uses none


def test_stage_over_the_shared_memory_limit_fails_naming_it(fixtures, tmp_path):
    stages = lower.compile_programs({"rev": fixtures.reverse_blocks(256)}, {**SM80, "embed_ptx": False}, tmp_path)
    (used,) = stages["rev"]["shared_memory_bytes"].values()
    assert used >= 256 * 4
    limited = {"kind": "cuda", "arch": "sm_80", "max_shared_memory_per_block": used - 1}
    with pytest.raises(ScheduleError, match=rf"stage 'rev' needs {used} bytes of shared memory, more than the "
                                            rf"target's max_shared_memory_per_block={used - 1}"):
        lower.compile_programs({"rev": fixtures.reverse_blocks(256)}, limited, tmp_path / "again")
