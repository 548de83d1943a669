"""
A layer's small steps in C, for float32 on the CPU: the code between the matrices.

    rms_norm(x, weight, eps)                       RMSNorm
    add_rms_norm(x, y, weight, eps)                x + y, and that normalised
    attention(qkv, cos, sin, k, v, pos, H, H_kv)   decoding rows: rotary, the cache write, attention
    silu_mul(gate_up)                              SwiGLU's silu(gate) * up

model.py defines each step in PyTorch and calls these instead when runs(...) says they apply:
float32 tensors on the CPU, contiguous, in eager mode, no gradients recorded, and fused.c
built. In eager PyTorch a step is 2 to 10 operator calls of 3-10 us each on a laptop-class
CPU, together more than int8's matrices take (README, "The layer's small steps in C"); here it
is one call. The rotary step and the residual add give PyTorch's bits; the norms, softmax and
silu are float32 computed in another order (a few units in the last place apart: the tests
bound it). Every function computes each row alone, so a row's result does not depend on the
other rows of its call: the batch invariance that int8's bitwise guarantee rests on.

`with fused.off():`, `enabled = False` or ADADECODE_FUSED=0 (or false, no, off) in the
environment run the PyTorch definitions instead (tests, timings).
"""
import contextlib
import ctypes
import os
import sys
from pathlib import Path

import torch

import cbuild

SOURCE = Path(__file__).with_name("fused.c")
enabled = os.environ.get("ADADECODE_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")
_lib = None           # the loaded library, or False where it cannot be built; on first use


def load(path):
    """fused.c's compiled library with its functions' argument types."""
    lib = ctypes.CDLL(str(path))
    P, L, Fl, Db = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_double
    lib.rms_norm.argtypes = [P, P, Db, P, L, L]
    lib.add_rms_norm.argtypes = [P, P, P, Db, P, P, L, L]
    lib.attention.argtypes = [P, L, P, P, P, P, L, P, L, L, L, L, L, Fl]
    lib.silu_mul.argtypes = [P, P, L, L]
    for fn in (lib.rms_norm, lib.add_rms_norm, lib.attention, lib.silu_mul):
        fn.restype = None
    return lib


def library():
    """The compiled library, or None (after one line saying why) where it cannot be built."""
    global _lib
    if _lib is None:
        _lib, why = cbuild.library(SOURCE, load)
        if _lib is None:
            print(f"note: a layer's small steps run in PyTorch (slower): {why}", file=sys.stderr)
            _lib = False
    return _lib or None


@contextlib.contextmanager
def off():
    """Inside this block model.py runs its PyTorch steps."""
    global enabled
    before, enabled = enabled, False
    try:
        yield
    finally:
        enabled = before


def runs(*tensors):
    """Whether fused.c computes a step on these tensors: float32, on the CPU, contiguous, eager,
    no gradients recorded."""
    if not enabled or torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:       # (is_cpu, not device.type: this runs 5 times a layer, and that costs 0.8 us)
        if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous() or (grad and t.requires_grad):
            return False
    return (_lib or library()) is not None


def rms_norm(x, weight, eps):
    """x (..., N) * rsqrt(mean(x^2) + eps) * weight (N,)"""
    N = x.shape[-1]
    out = torch.empty_like(x)
    (_lib or library()).rms_norm(x.data_ptr(), weight.data_ptr(), eps, out.data_ptr(), x.numel() // max(N, 1), N)
    return out


def add_rms_norm(x, y, weight, eps):
    """(h, rms_norm(h)) for h = x + y, all (..., N)"""
    N = x.shape[-1]
    h, out = torch.empty_like(x), torch.empty_like(x)
    (_lib or library()).add_rms_norm(x.data_ptr(), y.data_ptr(), weight.data_ptr(), eps, h.data_ptr(),
                                     out.data_ptr(), x.numel() // max(N, 1), N)
    return h, out


def attention(qkv, cos, sin, k, v, pos, H, H_kv):
    """Decoding attention for rows qkv (1, T, (H + 2*H_kv)*D), the q/k/v projection's output, at
    positions pos..pos+T-1: the rotary step on q and k (cos, sin: (T, 1, D)), k and v written
    into a layer's cache k, v (1, H_kv, S, D) at those positions, and row t's attention to
    positions 0..pos+t, each row alone. (1, T, H*D)"""
    T = qkv.shape[1]
    D = qkv.shape[2] // (H + 2 * H_kv)
    out = qkv.new_empty(1, T, H * D)
    (_lib or library()).attention(qkv.data_ptr(), qkv.shape[2], cos.data_ptr(), sin.data_ptr(), k.data_ptr(),
                                  v.data_ptr(), k.stride(1), out.data_ptr(), T, H, H_kv, D, pos, D ** -0.5)
    return out


def silu_mul(gate_up):
    """silu(gate) * up for gate_up (..., 2F), the gate/up projection's output: (..., F)"""
    Fd = gate_up.shape[-1] // 2
    out = gate_up.new_empty(gate_up.shape[:-1] + (Fd,))
    (_lib or library()).silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // max(2 * Fd, 1), Fd)
    return out
