"""Compile TileLang PrimFuncs to loadable files, and load them back without recompiling.

Findings for TileLang 0.1.15 (execution_backend="tvm_ffi"), used by fsagen.cache.CompiledKernel:

(a) Calling convention.  `JITKernel.export_library(path)` writes one shared object holding the host
    wrapper and the cubin.  After `import tilelang` (it registers the CUDA module loader),
    `tvm_ffi.load_module(path)[entry]` is a `tvm_ffi.Function` named by the PrimFunc's global_symbol.
    It takes the PrimFunc's parameters positionally: torch tensors directly (zero-copy through the
    DLPack exchange API) and python int/float for scalar parameters.  Symbolic dims (T.dynamic) are
    read from the tensors' shapes, so one compiled file serves every N.  The host wrapper checks
    arg count, ndim, dtype, device type and (static) shapes and raises RuntimeError naming the buffer.
(b) Stream.  On each call tvm_ffi asks torch (DLPack exchange API `current_work_stream`) for the
    current stream of the first CUDA tensor argument's device and sets it as TVM-FFI's environment
    stream for that call (TVMFFIEnvSetStream, restored afterwards); the kernel launch reads it with
    TVMFFIEnvGetStream.  So a stage launches on torch.cuda.current_stream(); nothing needs to be
    passed, and CUDA-graph capture sees the launch.  (A stage with no tensor argument would launch
    on the default stream; fsagen's stages always take tensors.)
(c) out_idx.  fsagen compiles with out_idx=None: the exported function takes every buffer (inputs
    and outputs) and returns None; the caller allocates outputs (e.g. with torch.empty on the
    current stream).  With out_idx set, TileLang's adapter would allocate outputs itself, which
    fsagen does not use (allocation belongs to the glue, so buffers can be reused).
(d) Targets and PTX.  A schedule's [target] table goes to tilelang.compile as is, except fsagen's
    own keys (FSAGEN_TARGET_KEYS).  TileLang has nvcc write a cubin (one SASS, no PTX) unless the
    target's `code` lists two or more SM tokens, then a fatbin; `code` accepts only sm_* tokens, and
    a `-gencode ...,code=compute_XX` flag next to --cubin fails ("multiple GPU code instances").
    So `embed_ptx = true` lists the arch twice in `code` (fatbin of sm_XX SASS) and adds the
    compute_XX PTX through TL_DEVICE_COMPILE_FLAGS: the driver JIT-compiles that PTX on GPUs newer
    than the arch (an sm80 build runs on an H100).  `fatbin_entries` lists what a library holds.
(e) Shared memory.  TileLang sizes each kernel's dynamic shared memory at compile time and passes
    it as the last launch argument in the host code; `dynamic_shared_memory` reads it from there,
    and a stage above the target's `max_shared_memory_per_block` (a TVM CUDA target attribute; the
    check is fsagen's, TileLang does not make it) fails its build naming the stage and the limit.
"""
from __future__ import annotations

import re
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from fsagen.errors import ScheduleError

EXECUTION_BACKEND = "tvm_ffi"
# [target] keys that fsagen interprets instead of passing them to TileLang (see (d) above).
FSAGEN_TARGET_KEYS = ("embed_ptx",)
SHARED_MEMORY_LIMIT = "max_shared_memory_per_block"


def tilelang_target(target: dict) -> tuple[dict, dict]:
    """(TileLang target dict, extra pass configs) of a schedule's [target] table; see (d) above."""
    from tilelang.transform import PassConfigKey

    tl_target = {k: v for k, v in target.items() if k not in FSAGEN_TARGET_KEYS}
    pass_configs = {}
    if target.get("embed_ptx"):
        arch = str(target["arch"])
        if not arch.startswith("sm_"):
            raise ValueError(f"[target] embed_ptx needs arch = 'sm_XX', got arch={arch!r}")
        code = list(tl_target.get("code", [arch]))
        tl_target["code"] = code if len(code) > 1 else code * 2  # two entries: nvcc writes a fatbin
        compute = "compute_" + arch.removeprefix("sm_")
        pass_configs[PassConfigKey.TL_DEVICE_COMPILE_FLAGS] = ["-gencode", f"arch={compute},code={compute}"]
    return tl_target, pass_configs


def _merge_pass_configs(base: dict, stage: dict) -> dict:
    """Stage pass configs over the target's; device compile flags (lists) are concatenated."""
    from tilelang.transform import PassConfigKey

    merged = {**base, **stage}
    flags = PassConfigKey.TL_DEVICE_COMPILE_FLAGS
    if flags in base and flags in stage:
        merged[flags] = [*base[flags], *stage[flags]]
    return merged


def _split_program(program):
    """A program is a PrimFunc, or (PrimFunc, pass_configs dict) when a stage needs pass configs."""
    if isinstance(program, tuple):
        func, pass_configs = program
        return func, dict(pass_configs or {})
    return program, {}


def _param_info(func) -> list[dict]:
    info = []
    for param in func.params:
        buf = func.buffer_map.get(param)
        if buf is None:
            info.append({"name": param.name, "kind": "scalar", "dtype": str(param.dtype)})
        else:
            info.append({
                "name": buf.name, "kind": "tensor", "dtype": str(buf.dtype),
                "shape": [str(dim) for dim in buf.shape],
            })
    return info


def compile_programs(programs: dict, target: dict, dest: Path) -> dict:
    """Compile each stage into dest/<stage>.so (+ <stage>.cu, the device source).

    Returns {stage: meta} for meta.json: file names, entry symbol, parameters, compile seconds.
    """
    import tilelang

    from fsagen import lower_cpu

    tl_target, target_configs = tilelang_target(target)
    limit = target.get(SHARED_MEMORY_LIMIT)
    stages = {}
    for stage, program in programs.items():
        func, stage_configs = _split_program(program)
        if lower_cpu.is_cpu_target(target):  # TileLang's C backend: fsagen/lower_cpu.py
            stages[stage] = lower_cpu.compile_stage(func, target, stage_configs, dest, stage)
            continue
        pass_configs = _merge_pass_configs(target_configs, stage_configs)
        # Read before compiling: a compile may mutate the PrimFunc.
        entry = str(func.attrs["global_symbol"]) if func.attrs and "global_symbol" in func.attrs else stage
        params = _param_info(func)
        start = time.perf_counter()
        try:
            kernel = tilelang.compile(
                func, out_idx=None, target=tl_target, execution_backend=EXECUTION_BACKEND,
                pass_configs=pass_configs or None,
            )
        except Exception as exc:
            _raise_if_register_cap(stage, exc)
            raise
        smem = dynamic_shared_memory(kernel.get_host_source(), kernel.get_kernel_source())
        if limit is not None and max(smem.values(), default=0) > int(limit):
            raise ScheduleError(
                f"stage {stage!r} needs {max(smem.values())} bytes of shared memory, more than the target's "
                f"{SHARED_MEMORY_LIMIT}={limit} ({smem}); use smaller tiles (rows, keys) or fewer num_stages"
            )
        library, source = f"{stage}.so", f"{stage}.cu"
        kernel.export_library(str(dest / library))
        (dest / source).write_text(kernel.get_kernel_source())
        stages[stage] = {
            "library": library, "source": source, "entry": entry, "params": params,
            "pass_configs": {str(k): v for k, v in stage_configs.items()},
            "shared_memory_bytes": smem,
            "compile_seconds": round(time.perf_counter() - start, 3),
        }
    return stages


_REGISTER_CAP = re.compile(r"Insufficient registers \((\d+)\)[^\n]*register target of (\d+)")


def _raise_if_register_cap(stage: str, exc: Exception) -> None:
    """ptxas refuses an instruction (a wgmma's accumulator) that does not fit the per-thread
    register cap a ``ctas_per_sm`` / ``q_ctas_per_sm`` knob set: say so in the schedule's terms."""
    found = _REGISTER_CAP.search(str(exc))
    if found:
        cap, need = found.groups()
        raise ScheduleError(
            f"stage {stage!r} needs at least {need} registers a thread, but the plan's CTAs-per-SM knob "
            f"(ctas_per_sm / q_ctas_per_sm) caps it at {cap}: lower that knob, or use smaller tiles "
            f"(rows, q_tokens)") from exc


def load_function(library: Path, entry: str, stage_meta: dict | None = None):
    """The callable of one exported stage; see (a)-(c) above for how to call it. A stage compiled
    for the CPU (its meta has an "abi") loads through fsagen/lower_cpu.py instead."""
    if stage_meta and "abi" in stage_meta:
        from fsagen.lower_cpu import load_function as load_cpu

        return load_cpu(library, entry, stage_meta["params"], stage_meta["abi"])
    import tilelang  # noqa: F401  (registers TileLang's runtime, which the library needs)
    import tvm_ffi

    module = tvm_ffi.load_module(str(library))
    return module[entry]


_KERNEL = re.compile(r"__global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(")
_LAUNCH = re.compile(r"TVMFFIFunctionCall\((\w+)_packed, \(TVMFFIAny\*\) (\w+), (\d+),")


def dynamic_shared_memory(host_source: str, kernel_source: str) -> dict[str, int]:
    """{kernel: dynamic shared memory bytes} of one compiled stage (see (e) above).

    In TileLang's tvm_ffi host code a launch packs the kernel's arguments, then the grid and
    block extents, and last the dynamic shared memory size (when the kernel has some, i.e. its
    source declares an ``extern __shared__`` buffer) before calling ``<kernel>_packed``.
    """
    usage: dict[str, int] = {}
    if "extern __shared__" not in kernel_source:
        return usage
    kernels = set(_KERNEL.findall(kernel_source))
    for call in _LAUNCH.finditer(host_source):
        kernel, stack, nargs = call.group(1), call.group(2), int(call.group(3))
        if kernel not in kernels:  # e.g. __tvm_set_device
            continue
        slot = re.escape(f"(((TVMFFIAny*){stack})[{nargs - 1}].v_int64) = ((int64_t)")
        sizes = re.findall(slot + r"(\d+)\)", host_source[:call.start()])
        if not sizes:
            raise RuntimeError(f"cannot find the shared memory size of the launch of {kernel!r} in the host code")
        usage[kernel] = max(usage.get(kernel, 0), int(sizes[-1]))
    return usage


_FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
_FATBIN_KINDS = {1: "ptx", 2: "sass"}


def fatbin_entries(library: Path) -> list[tuple[str, int]]:
    """[(kind, arch)] of the CUDA fat binaries embedded in a compiled library: ("ptx", 80) is
    compute_80 PTX, ("sass", 80) sm_80 machine code.  Empty for a plain cubin (one SASS, no
    PTX).  Reads the fatbin container headers (magic, header size, payload size; per entry its
    kind, header size, payload size and, at byte 28, the arch)."""
    data = Path(library).read_bytes()
    entries, pos = [], 0
    while (start := data.find(_FATBIN_MAGIC, pos)) >= 0:
        header_size, total = struct.unpack_from("<HQ", data, start + 6)
        entry, end = start + header_size, start + header_size + total
        while entry < end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            entries.append((_FATBIN_KINDS.get(kind, str(kind)), arch))
            entry += entry_header + size
        pos = end
    return entries


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_NUMBERS = re.compile(r"(\d+) (registers|bytes smem|bytes stack frame|bytes spill stores|bytes spill loads)")


def resource_usage(cuda_source: str, target: dict) -> dict[str, dict[str, int]]:
    """{kernel: {"registers", "bytes smem", "bytes spill stores", ...}} from ptxas --verbose.

    TileLang 0.1.15 leaves `JITKernel.n_regs` empty on CUDA, so this compiles the stored source
    again (seconds; on demand only, e.g. `fsagen show --resources`) with TileLang's include paths.
    Stage pass configs that change nvcc flags (fast math) are not replayed.  TileLang kernels use
    dynamic shared memory, which ptxas does not report (the launch sets its size).
    """
    if target.get("kind") != "cuda":
        from fsagen.errors import ArtifactError

        raise ArtifactError(f"resource usage (ptxas registers, spills) exists for CUDA targets only; target is {target}")
    from tilelang.contrib.cc import get_cplus_compiler
    from tilelang.contrib.nvcc import get_nvcc_compiler
    from tilelang.env import CUTLASS_INCLUDE_DIR, TILELANG_TEMPLATE_PATH

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "stage.cu"
        src.write_text(cuda_source)
        cmd = [
            get_nvcc_compiler(), f"-ccbin={get_cplus_compiler()}", "--cubin", "-O3", "-std=c++20",
            f"-arch={target['arch']}", "-I" + TILELANG_TEMPLATE_PATH, "-I" + CUTLASS_INCLUDE_DIR,
            "--ptxas-options=--verbose", "-w", "-o", str(Path(tmp) / "stage.cubin"), str(src),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}")
    usage: dict[str, dict[str, int]] = {}
    current = None
    for line in (proc.stdout + proc.stderr).splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = usage.setdefault(entry.group(1), {})
        elif current is not None:
            for number, what in _NUMBERS.findall(line):
                current[what] = int(number)
    return usage
