"""Choosing how window attention runs: the fused Triton kernel or the runtime's PyTorch path (``attention.py``).

Rules (``backend`` argument, or the ``GREENMIM_ATTENTION_BACKEND`` environment variable, which
replaces ``"auto"`` when set; both take ``"auto" | "torch" | "triton"``):

- ``"torch"``: always the PyTorch path (any device, supports dropout).
- ``"triton"``: always the fused kernel. Raises instead of falling back when it cannot run: Triton
  missing, ``dropout_p > 0`` (the kernel has no dropout), or CPU tensors outside Triton's CPU
  interpreter (``TRITON_INTERPRET=1`` set before triton is imported; slow, meant for tests).
- ``"auto"``: the fused kernel for CUDA tensors when Triton is installed, ``dropout_p == 0`` and
  the dtype/head dim are supported; the PyTorch path otherwise (so attention dropout during training
  takes the PyTorch path, the only one implementing it).
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "GREENMIM_ATTENTION_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton can be imported (the fused kernel's only extra dependency)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _interpreter_active() -> bool:
    """Whether the fused kernels run in Triton's CPU interpreter in this process."""
    from greenmim_convert.kernels.triton_group_attention import interpreter_active

    return interpreter_active()


def _check_backend(name: str, source: str) -> str:
    """Validate a backend name coming from ``source`` (argument or environment variable)."""
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return value


def requested_backend(backend: str = "auto") -> str:
    """The backend asked for: ``backend``, or the environment variable when ``backend`` is "auto"."""
    backend = _check_backend(backend, "backend")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            backend = _check_backend(env, ENV_VAR)
    return backend


def resolve_backend(q: torch.Tensor, dropout_p: float = 0.0, backend: str = "auto") -> str:
    """The implementation window attention runs for ``q`` ``(G, heads, g, d)``: "torch" or "triton" (see module doc).

    Raises ``RuntimeError``/``ValueError`` when "triton" is forced but cannot run.
    """
    choice = requested_backend(backend)
    if choice == "torch":
        return "torch"
    if choice == "auto":
        if q.device.type != "cuda" or dropout_p > 0.0 or not triton_available():
            return "torch"
        from greenmim_convert.kernels.triton_group_attention import MAX_HEAD_DIM, SUPPORTED_DTYPES

        fits = q.dtype in SUPPORTED_DTYPES and q.dim() == 4 and q.shape[-1] <= MAX_HEAD_DIM
        return "triton" if fits else "torch"
    if dropout_p > 0.0:
        raise ValueError(
            f"the Triton group attention has no dropout (dropout_p={dropout_p}); use "
            f"backend='torch' or 'auto' (which takes the PyTorch path when dropout_p > 0)"
        )
    if not triton_available():
        raise RuntimeError(
            "backend 'triton' requested but Triton is not installed (pip install 'greenmim-convert[triton]')"
        )
    if q.device.type == "cpu" and not _interpreter_active():
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported (tests only, it is slow), move the tensors to a "
            "GPU, or use backend='torch'"
        )
    return "triton"
