"""
The int8 matmul that every int8 linear layer runs: y = x W^T for W stored as int8 with one
float32 scale per output channel (quantize.Int8Linear holds the weights).

Each row of x is written as 16-bit integers, x ~= s*q (finer than bfloat16), so that its
products with W are integer sums, exact in any order. That makes the result of a row
independent of the other rows in its call (batch invariance: AdaDecode's batched rows get
greedy's bits) and lets a vector kernel add in any order it likes.

    int8mm_reference(x, wq, scale)    the definition, in PyTorch (float64 sums of integers: exact)
    int8mm(x, pack(wq), wsum, scale)  the same bits from int8mm.c, with AMX tiles where the CPU has
                                      them: as fast for 8 rows as for one (README, "int8 and int4 on the CPU")

int8mm.c is compiled once per CPU and compiler with the machine's C compiler (cbuild.py);
where none works, int8mm runs the reference (exact, slow) and says so once.
"""
import ctypes
import sys
from pathlib import Path

import torch

import cbuild
from cbuild import TRIES

SOURCE = Path(__file__).with_name("int8mm.c")
QMAX = 32767          # each row of activations as s * q, q on -QMAX..QMAX
MAX_K = 66_000        # past this the byte paths' int32 sum of K products of at most 255 * 127 could overflow


def split_rows(x):
    """Each row of x (M, K) float32 as s * q, q on -32767..32767 (a float tensor holding
    integers): (q, s), s (M, 1). A row of zeros (or of values below 1e-30) gets s = 1."""
    amax = x.abs().amax(-1, keepdim=True)
    s = torch.where(amax > 1e-30, amax / QMAX, 1.0)
    return torch.round(x / s).clamp(-QMAX, QMAX), s


def int8mm_reference(x, wq, scale, bias=None):
    """y (M, N) float32 = x (M, K) float32 times wq (N, K) int8 scaled by scale (N,) float32,
    the way int8mm.c computes it: the dot products of q and wq in float64, where sums of
    integers below 2**53 are exact; then (s * d) * scale in float64, rounded to float32,
    plus bias. A row with a NaN or an inf gives NaN."""
    bad = ~torch.isfinite(x).all(-1, keepdim=True)
    q, s = split_rows(torch.where(bad, 0.0, x))
    y = ((s.double() * (q.double() @ wq.double().t())) * scale.double()).float()
    y = torch.where(bad, float("nan"), y)
    return y if bias is None else y + bias


def pack(wq):
    """wq (N, K) int8 in int8mm.c's layout: tiles of 16 outputs by 64 inputs, (N/16, K/64, 16, 16, 4),
    tile row r holding each output's inputs 4r..4r+3 (AMX's); N and K padded with zeros."""
    N, K = wq.shape
    w = torch.zeros(-(-N // 16) * 16, -(-K // 64) * 64, dtype=torch.int8)
    w[:N, :K] = wq
    return w.view(w.shape[0] // 16, 16, w.shape[1] // 64, 16, 4).permute(0, 2, 3, 1, 4).contiguous()


def unpack(wp, N, K):
    """pack's inverse: wq (N, K)."""
    return wp.permute(0, 3, 1, 2, 4).reshape(wp.shape[0] * 16, wp.shape[1] * 64)[:N, :K].contiguous()


def build(cc=None, tries=TRIES, folder=None):
    """Compile int8mm.c (cbuild.build): the library's path, or (None, why)."""
    return cbuild.build(SOURCE, cc, tries, folder)


def load(path):
    """The compiled kernel as a ctypes function with its argument types, and its ISA name."""
    lib = ctypes.CDLL(str(path))
    fn = lib.int8mm
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long] * 3
    fn.restype = ctypes.c_int
    lib.int8mm_isa.restype = ctypes.c_char_p
    return fn, lib.int8mm_isa().decode()


_kernel = None          # (ctypes function or None, description), on first use


def kernel():
    """The kernel this process uses, built and loaded on first use: (function or None, what it is:
    "amx", "avx512-vnni", "avx2", "c", or why it is the PyTorch reference)."""
    global _kernel
    if _kernel is None:
        _kernel, why = cbuild.library(SOURCE, load)
        if _kernel is None:
            print(f"note: int8 runs the PyTorch reference of its kernel (exact, slow): {why}", file=sys.stderr)
            _kernel = (None, f"reference: {why}")
    return _kernel


def int8mm(x, wp, wsum, scale, bias=None, fn=None):
    """y (..., N) = x (..., K) times int8 W (N, K): wp is W packed (pack), wsum (N,) int32 its
    row sums, scale (N,) float32 its per-row scales, bias (N,) float32 or None. The result has
    x's dtype (computed from x in float32). `fn`: a kernel from load(), for tests; default the
    process's own."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        return int8mm(x.float().contiguous(), wp, wsum, scale, bias, fn).to(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("int8 layers compute no gradients: train on the float model")
    fn = fn or kernel()[0]
    K, N = x.shape[-1], scale.shape[0]
    if fn is None:
        return int8mm_reference(x.reshape(-1, K), unpack(wp, N, K), scale, bias).view(x.shape[:-1] + (N,))
    y = torch.empty(x.shape[:-1] + (N,))          # a call costs about 8 us beside the kernel's work
    if fn(x.data_ptr(), wp.data_ptr(), wsum.data_ptr(), scale.data_ptr(), 0 if bias is None else bias.data_ptr(),
          y.data_ptr(), x.numel() // K, K, N):
        raise MemoryError("int8 kernel: out of memory")
    return y


# For torch.compile: the same call as an opaque operator with a shape rule (dynamo cannot
# trace a ctypes call). Eager code calls int8mm directly, a few microseconds cheaper.
@torch.library.custom_op("adadecode::int8mm", mutates_args=())
def int8mm_op(x: torch.Tensor, wp: torch.Tensor, wsum: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    return int8mm(x, wp, wsum, scale, bias)


@int8mm_op.register_fake
def _(x, wp, wsum, scale, bias):
    return x.new_empty(*x.shape[:-1], scale.shape[0])
