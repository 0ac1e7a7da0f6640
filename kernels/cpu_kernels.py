"""Native CPU loops for the depthwise gather (``cpu_depthwise.c``), built with the system's C compiler on first use.

PyTorch has no op for "sum of per-tap weighted row gathers", so the portable path materialises a
``(rows, taps, channels)`` temporary per chunk and pays a dozen ATen calls per chunk. The C loops read
each gathered row once and accumulate in place, on PyTorch's own OpenMP threads. They are built once per machine into
``$GREENMIM_CACHE`` (default ``~/.cache/greenmim_convert``), one shared library per dtype, and called
through ``ctypes`` (which releases the GIL). ``GREENMIM_CPU_KERNELS=0`` turns them off. Where they cannot
be built, :func:`cpu_kernel_problem` says why and the depthwise ops warn once and run their PyTorch loops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

SOURCE = Path(__file__).with_name("cpu_depthwise.c")
REALS = {torch.float32: "float", torch.float64: "double"}
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fopenmp", "-std=c99"]
_libs: Dict[torch.dtype, ctypes.CDLL] = {}
_problems: Dict[torch.dtype, str] = {}
_warned = set()


def _cpu_model() -> str:
    """The processor's model line: libraries built with ``-march=native`` are only reused on the same kind."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Processor", "CPU part")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _library_path(real: str, compiler: str) -> Path:
    cache = Path(os.environ.get("GREENMIM_CACHE", Path.home() / ".cache" / "greenmim_convert"))
    key = hashlib.sha256("\0".join([SOURCE.read_text(), real, compiler, *FLAGS, _cpu_model()]).encode()).hexdigest()[
        :16
    ]
    return cache / f"cpu_depthwise-{real}-{key}.so"


def _build(real: str) -> ctypes.CDLL:
    """Compile (once per source, dtype and machine kind) and load the library for ``real``."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    path = _library_path(real, compiler)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            result = subprocess.run(
                [compiler, *FLAGS, f"-DREAL={real}", str(SOURCE), "-o", tmp], capture_output=True, text=True
            )
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-500:]}")
            os.replace(tmp, path)  # atomic: concurrent builders (one per DDP rank) all land one complete file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.taps.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.taps_backward.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.taps.restype = lib.taps_backward.restype = ctypes.c_int
    return lib


def cpu_kernel_problem(dtype: torch.dtype) -> Optional[str]:
    """Why the native loops cannot run ``dtype`` tensors here, or None when they can (built on first call)."""
    if os.environ.get("GREENMIM_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "turned off by GREENMIM_CPU_KERNELS=0"
    if dtype not in REALS:
        return f"they are built for float32 and float64, not {dtype}"
    if dtype not in _libs and dtype not in _problems:
        try:
            _libs[dtype] = _build(REALS[dtype])
        except (OSError, RuntimeError) as err:
            _problems[dtype] = str(err)
    return _problems.get(dtype)


def _library(dtype: torch.dtype) -> Optional[ctypes.CDLL]:
    """The loaded library for ``dtype``, or None (warning once per dtype) when it cannot be used."""
    problem = cpu_kernel_problem(dtype)
    if problem is None:
        return _libs[dtype]
    if dtype in REALS and dtype not in _warned and "GREENMIM_CPU_KERNELS" not in problem:
        _warned.add(dtype)
        warnings.warn(f"native CPU depthwise loops unavailable ({problem}); using the PyTorch loops", RuntimeWarning)
    return None


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def taps(src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
    """``out[t] = sum_k weight[k] * src[index[t, k]]`` with the native loop (an index ``len(src)`` reads zero), or
    None when it cannot run."""
    lib = _library(src.dtype)
    if lib is None or weight.dtype != src.dtype:
        return None
    src, index, weight = src.contiguous(), index.contiguous(), weight.contiguous()
    out = src.new_empty(index.shape[0], src.shape[1])
    lib.taps(
        _ptr(src),
        src.shape[0],
        _ptr(index),
        _ptr(weight),
        _ptr(out),
        index.shape[0],
        index.shape[1],
        src.shape[1],
        torch.get_num_threads(),
    )
    return out


def taps_backward(
    x: torch.Tensor, grad_src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, need_x: bool = True
) -> Optional[Tuple[Optional[torch.Tensor], torch.Tensor]]:
    """``(dx, dw)`` with ``dw[k] = sum_i x[i] * grad_src[index[i, k]]`` and ``dx[i] = sum_k weight[k] *
    grad_src[index[i, k]]`` (None unless ``need_x``), both from one pass of the native loop over the gathered rows
    (an index ``len(grad_src)`` reads zero); None when the loop cannot run."""
    lib = _library(x.dtype)
    if lib is None or grad_src.dtype != x.dtype or weight.dtype != x.dtype:
        return None
    x, grad_src, index, weight = x.contiguous(), grad_src.contiguous(), index.contiguous(), weight.contiguous()
    dw = x.new_empty(index.shape[1], x.shape[1])
    dx = x.new_empty(index.shape[0], x.shape[1]) if need_x else None
    if (
        lib.taps_backward(
            _ptr(x),
            _ptr(grad_src),
            grad_src.shape[0],
            _ptr(index),
            _ptr(weight),
            _ptr(dx) if dx is not None else None,
            _ptr(dw),
            index.shape[0],
            index.shape[1],
            x.shape[1],
            torch.get_num_threads(),
        )
        != 0
    ):
        raise MemoryError(
            f"taps_backward could not allocate {torch.get_num_threads()} partial sums of {tuple(dw.shape)}"
        )
    return dx, dw
