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
"""
from __future__ import annotations

import re
import subprocess
import tempfile
import time
from pathlib import Path

EXECUTION_BACKEND = "tvm_ffi"


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

    stages = {}
    for stage, program in programs.items():
        func, pass_configs = _split_program(program)
        if lower_cpu.is_cpu_target(target):  # TileLang's C backend: fsagen/lower_cpu.py
            stages[stage] = lower_cpu.compile_stage(func, target, pass_configs, dest, stage)
            continue
        # Read before compiling: a compile may mutate the PrimFunc.
        entry = str(func.attrs["global_symbol"]) if func.attrs and "global_symbol" in func.attrs else stage
        params = _param_info(func)
        start = time.perf_counter()
        kernel = tilelang.compile(
            func, out_idx=None, target=target, execution_backend=EXECUTION_BACKEND,
            pass_configs=pass_configs or None,
        )
        library, source = f"{stage}.so", f"{stage}.cu"
        kernel.export_library(str(dest / library))
        (dest / source).write_text(kernel.get_kernel_source())
        stages[stage] = {
            "library": library, "source": source, "entry": entry, "params": params,
            "pass_configs": {str(k): v for k, v in pass_configs.items()},
            "compile_seconds": round(time.perf_counter() - start, 3),
        }
    return stages


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
