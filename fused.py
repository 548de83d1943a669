"""
A layer's steps in C, on the CPU, for float32 and for the float32 code around int8's matrices:
the linear layers at a few rows, the code between them, and a whole block in one call.

    linear(x, weight, bias)                        x @ weight.T + bias (decoding's few rows)
    rms_norm(x, weight, eps)                       RMSNorm
    add_rms_norm(x, y, weight, eps)                x + y, and that normalised
    attention(qkv, cos, sin, k, v, pos, H, H_kv)   decoding rows: rotary, the cache write, attention
    silu_mul(gate_up)                              SwiGLU's silu(gate) * up
    argmax(x)                                      x.argmax(-1)
    block(blk, x, pos, cache, layer, cos, sin)     a whole TransformerBlock: the steps above, with
                                                   `linear` or int8's kernel for its matrices
    head_check(heads, layer, h)                    an exit head's check (heads.py's features)

model.py defines each step in PyTorch and calls these instead when runs(...) says they apply:
float32 tensors on the CPU, contiguous, in eager mode, no gradients recorded, and fused.c
built. In eager PyTorch a step is 2 to 10 operator calls of 3-10 us each on a laptop-class
CPU, together more than int8's matrices take (README, "The layer's small steps in C"); here it
is one call, and a decoding block is one call in all. The linear layer reads the weights
faster than F.linear at a few rows (README, "float32's matrices in C"). The rotary step and
the residual add give PyTorch's bits; the matrices, norms, softmax and silu are float32
computed in another order (a few units in the last place apart: the tests bound it). Every
function computes each row alone, so a row's result does not depend on the other rows of its
call: the batch invariance that AdaDecode's bitwise guarantee rests on.

`with fused.off():`, `enabled = False` or ADADECODE_FUSED=0 (or false, no, off) in the
environment run the PyTorch definitions instead (tests, timings).
"""
import contextlib
import ctypes
import os
import sys
import weakref
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
    lib.linear.argtypes = [P, P, P, P, L, L, L]
    lib.rms_norm.argtypes = [P, P, Db, P, L, L]
    lib.add_rms_norm.argtypes = [P, P, P, Db, P, P, L, L]
    lib.attention.argtypes = [P, L, P, P, P, P, L, P, L, L, L, L, L, Fl]
    lib.silu_mul.argtypes = [P, P, L, L]
    lib.argmax_rows.argtypes = [P, L, L, P]
    lib.layers.argtypes = [P, P, L, L, P, P, P, P, L, L, L, L, P]
    lib.head_check.argtypes = [P, P, L, L, L, P, Db, P, P]
    for fn in (lib.linear, lib.rms_norm, lib.add_rms_norm, lib.attention, lib.silu_mul, lib.argmax_rows):
        fn.restype = None
    lib.layers.restype = lib.head_check.restype = ctypes.c_int
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
    """Whether fused.c computes a step on these tensors (None: an absent bias, no matter):
    float32, on the CPU, contiguous, eager, no gradients recorded."""
    if not enabled or torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:       # (is_cpu, not device.type: 0.8 us less a call)
        if t is None:
            continue
        if not _float32_cpu(t) or (grad and t.requires_grad):
            return False
    return (_lib or library()) is not None


def _float32_cpu(t):
    return t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()


def linear(x, weight, bias=None):
    """x (..., K) @ weight (N, K).T + bias (N,): (..., N)"""
    N, K = weight.shape
    out = x.new_empty(x.shape[:-1] + (N,))
    (_lib or library()).linear(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                               out.data_ptr(), x.numel() // max(K, 1), N, K)
    return out


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


def argmax(x):
    """x.argmax(-1), the first maximum (or NaN) of each row: (...,) int64"""
    out = torch.empty(x.shape[:-1], dtype=torch.long)
    (_lib or library()).argmax_rows(x.data_ptr(), out.numel(), x.shape[-1], out.data_ptr())
    return out


def block(blk, x, pos, cache, layer, cos, sin):
    """TransformerBlock blk's forward for decoding rows x (1, T, dim) at positions pos..pos+T-1,
    its k and v written into `layer` of `cache`, in one call of the steps above (the same bits):
    (1, T, dim); or None, where fused.c does not compute this block (a linear layer neither
    model.Linear nor int8's Int8Linear with its kernel built, or a tensor runs() refuses)."""
    plan = _plans.get(blk)
    if plan is None or not plan.current():
        plan = _plans[blk] = BlockPlan(blk)
    if plan.struct is None or not _runs_on(x, cos, sin, cache, plan.floats):
        return None
    k, v = cache.claim(layer, pos, x.shape[1])
    return _call(x, cos.data_ptr(), sin.data_ptr(), k, v, 0, pos, 1, ctypes.addressof(plan.struct))


def layers(model, h, pos, cache, start, end):
    """Layers start..end-1 of `model` (a Transformer) for decoding rows h (1, T, dim), as
    block() computes each, in one C call: the last one's output (1, T, dim); or None where
    block() would not compute one of them, or one is not a plain TransformerBlock or has
    forward hooks (they run block by block, as model.run_layers then does). The rotary
    tables are read in place, from row pos on: no copy, no operator call."""
    cos, sin, T = model.rope_cos, model.rope_sin, h.shape[1]
    if cos is None or pos + T > cos.shape[0]:
        return None
    plan = _plans.get(model)
    if plan is None or not plan.holds_for(cache):
        plan = _plans[model] = ModelPlan(model)
        plan.checked = weakref.ref(cache)
    if not plan.computes(start, end) or not _runs_on(h, cos, sin, cache, plan.floats):
        return None
    cache.claim_layers(start, end, pos, T)
    stride = cache.k.stride(0)                  # floats from one layer's cache to the next
    row = pos * cos.stride(0) * 4               # bytes to the tables' row pos
    return _call(h, cos.data_ptr() + row, sin.data_ptr() + row, cache.layer_k[start], cache.layer_v[start], stride,
                 pos, end - start, plan.address(start))


def _call(x, cos, sin, k, v, layer_stride, pos, n, plans):
    """fused.c's layers() on rows x, n layers from the LayerPlan at address `plans`; cos and sin
    are the addresses of the rows' rotary tables"""
    out = torch.empty_like(x)
    if (_lib or library()).layers(x.data_ptr(), out.data_ptr(), x.shape[1], x.shape[2], cos, sin,
                                  k.data_ptr(), v.data_ptr(), layer_stride, k.stride(1), pos, n, plans):
        raise MemoryError("fused.c: out of memory")
    return out


class LayerPlan(ctypes.Structure):
    """fused.c's layer_plan: block()'s arguments apart from the rows, the positions and the cache"""
    _fields_ = [("F", ctypes.c_long), ("H", ctypes.c_long), ("H_kv", ctypes.c_long), ("D", ctypes.c_long),
                ("eps", ctypes.c_double), ("scale", ctypes.c_float), ("g1", ctypes.c_void_p), ("g2", ctypes.c_void_p),
                ("kernels", ctypes.c_void_p * 4), ("mats", ctypes.c_void_p * 16)]


class BlockPlan:
    """One TransformerBlock's LayerPlan (`struct`; None where fused.c does not compute the
    block), made once: made on every call, in Python, these arguments cost 50-80 us a layer, a
    quarter of int8's decoding step (README, "A run of layers in one call"). It holds while
    nothing it was made from changes: no module, parameter or buffer assigned anywhere
    (PyTorch's registration hooks bump `_generation`), every tensor at its address (`t.data =
    ...`, as checkpoint.in_huge_pages does, gives another), the norms' eps the same."""

    def __init__(self, blk):
        self.generation, self.struct = _generation, None
        self.tensors, self.addresses, self.floats, self.norms, self.eps = [], [], [], (), None
        # the modules and weights through nn.Module's dicts: its attribute lookup costs 1.4 us on
        # the Intel Xeon
        att, ffn = blk._modules["attention"], blk._modules["feed_forward"]
        n1, n2 = blk._modules["attention_norm"], blk._modules["ffn_norm"]
        kernels, arrays, floats = [], [], [n1._parameters["weight"], n2._parameters["weight"]]
        for m in (att._modules["wqkv"], att._modules["wo"], ffn._modules["w13"], ffn._modules["w2"]):
            found = _matrix(m)
            if found is None:
                return
            kernels.append(found[0])
            arrays += found[1]
            floats += found[2]
        self.floats = [t for t in floats if t is not None]
        self.tensors = [t for t in arrays if t is not None] + self.floats
        self.addresses = [t.data_ptr() for t in self.tensors]
        self.norms, self.eps = (n1, n2), n1.eps
        if n1.eps != n2.eps or not all(_float32_cpu(t) for t in self.floats):
            return
        self.struct = LayerPlan(ffn.ffn_dim, att.H, att.H_kv, att.D, n1.eps, att.D ** -0.5, self.floats[0].data_ptr(),
                                self.floats[1].data_ptr(), (ctypes.c_void_p * 4)(*kernels),
                                (ctypes.c_void_p * 16)(*(0 if a is None else a.data_ptr() for a in arrays)))

    def current(self):
        """Whether nothing it was made from has changed."""
        return (self.generation == _generation and all(n.eps == self.eps for n in self.norms)
                and list(map(_address, self.tensors)) == self.addresses)


class ModelPlan:
    """Every layer's BlockPlan, their LayerPlans side by side for layers() (a run of layers is a
    pointer into the array), made once, as BlockPlan, and checked once per KV cache
    (holds_for)."""

    def __init__(self, model):
        self.generation = _generation
        self.blocks = [_plans[b] if b in _plans and _plans[b].current() else BlockPlan(b) for b in model.layers]
        for b, p in zip(model.layers, self.blocks):
            _plans[b] = p
        self.array = (LayerPlan * len(self.blocks))(*(p.struct or LayerPlan() for p in self.blocks))
        # fused.c computes each block as its forward would: a plain TransformerBlock (not a
        # subclass), fused.c able to, no forward hooks (two dicts a block, checked per call)
        self.computed = [p.struct is not None and type(b) is _block_class() for b, p in zip(model.layers, self.blocks)]
        self.hooks = [d for b in model.layers for d in (b._forward_hooks, b._forward_pre_hooks)]
        self.floats = [t for p in self.blocks for t in p.floats]
        self.norms = [n for p in self.blocks for n in (p.norms or (None, None))]
        self.eps = [None if n is None else n.eps for n in self.norms]
        self.tensors = [t for p in self.blocks for t in p.tensors]      # every block's, in one list
        self.addresses = [a for p in self.blocks for a in p.addresses]
        self.checked = None             # the KV cache it was last checked for (a weak reference)

    def holds_for(self, cache):
        """Whether the plan holds for a call on `cache`: current() for every layer, checked in
        full once per cache, that is once per generation. Checked on every call it cost 100-300
        us a 30-layer call, 4% of an int8 greedy token (README, "A run of layers in one call"),
        fetching the tensors' headers back into the CPU's caches. Between two calls on one cache
        only an assignment of a module, parameter or buffer (`_generation`) is seen; a weight
        moved with `.data =` or a norm's eps set while a generation runs is not."""
        if self.generation == _generation and self.checked is not None and self.checked() is cache:
            return True
        if not self.current():
            return False
        self.checked = weakref.ref(cache)
        return True

    def current(self):
        """BlockPlan.current() for every layer at once"""
        return (self.generation == _generation and [getattr(n, "eps", None) for n in self.norms] == self.eps
                and list(map(_address, self.tensors)) == self.addresses)

    def computes(self, start, end):
        """Whether layers() computes layers start..end-1 (see `computed`)"""
        m = torch.nn.modules.module
        return (all(self.computed[start:end]) and not any(self.hooks[2 * start:2 * end])
                and not (getattr(m, "_global_forward_hooks", None) or getattr(m, "_global_forward_pre_hooks", None)))

    def address(self, i):
        return ctypes.addressof(self.array) + i * ctypes.sizeof(LayerPlan)


def _runs_on(x, cos, sin, cache, floats):
    """runs() for a call on rows x with weights `floats`: their dtype and place were checked when
    the plan was made; whether they need gradients matters only while gradients are recorded"""
    return runs(x, cos, sin, cache.k) and not (torch.is_grad_enabled() and any(t.requires_grad for t in floats))


def _block_class():
    from model import TransformerBlock
    return TransformerBlock


def _bump(*_):
    global _generation
    _generation += 1


_address = torch.Tensor.data_ptr
_plans = weakref.WeakKeyDictionary()        # TransformerBlock -> its BlockPlan, Transformer -> its ModelPlan
_generation = 0
for _register in (torch.nn.modules.module.register_module_module_registration_hook,
                  torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_buffer_registration_hook):
    _register(_bump)


def head_check(heads, layer, h):
    """heads.features(layer, h) for hidden states h (N, d), in one C call: u = T h, the residual
    block, the final norm, the projection onto the shortlist (or the vocabulary), and each row's
    [top-1 index, p1, p2, entropy, lse] (N, 5); or None where fused.c does not compute it (as
    block: a projection neither model.Linear nor Int8Linear, a tensor runs() refuses)."""
    i = heads.index[layer]
    if h.dim() == 0 or h.shape[-1] != heads.T.shape[-1]:      # PyTorch's steps say what is wrong
        return None
    norm, output = heads._frozen
    project = output if heads.shortlist is None else heads._short_out[0]
    W = heads.W is not None
    found = [_matrix(heads._T8[i]) if heads._T8 else _weight(heads.T[i]),
             (_matrix(heads._W8[i]) if heads._W8 else _weight(heads.W[i])) if W else (None, (None,) * 4, ()),
             _matrix(project)]
    if None in found:
        return None
    g = norm._parameters["weight"]
    if not runs(h, g, *(t for f in found for t in f[2])):
        return None
    h = h.reshape(-1, h.shape[-1])
    V = found[2][1][2].numel() if found[2][0] else found[2][1][0].shape[0]     # int8: one scale per row
    out = h.new_empty(h.shape[0], 5)
    mats = [0 if a is None else a.data_ptr() for f in found for a in f[1]]
    if (_lib or library()).head_check(h.data_ptr(), out.data_ptr(), h.shape[0], h.shape[1], V, g.data_ptr(),
                                      norm.eps, (ctypes.c_void_p * 3)(*(f[0] for f in found)),
                                      (ctypes.c_void_p * 12)(*mats)):
        raise MemoryError("fused.c: out of memory")
    return out


def _weight(w):
    """A float32 matrix (N, K) as _matrix gives a layer: `linear` multiplies it, no bias."""
    return None, (w, None, None, None), (w,)


def _matrix(m):
    """A linear layer as fused.c's block multiplies it: (its kernel's address, or None for
    float32's `linear`; (weight, the kernel's two more arrays or None, bias or None); the
    float32 ones among them, for runs()), or None where block cannot."""
    global _classes, _int8_kernel
    if _classes is None:            # model.py and quantize.py import this file: theirs on first use
        from model import Linear
        from quantize import Int8Linear
        _classes = Linear, Int8Linear
    if type(m) is _classes[0]:
        w, b = m._parameters["weight"], m._parameters["bias"]
        return None, (w, None, None, b), (w, b)
    if type(m) is _classes[1]:                                 # int8mm's packed weights, row sums, scales
        if _int8_kernel is None:
            import int8mm
            fn = int8mm.kernel()[0]
            _int8_kernel = fn and ctypes.cast(fn, ctypes.c_void_p).value     # 0: the reference runs, not C
        a = m._buffers
        if _int8_kernel:
            return _int8_kernel, (a["wp"], a["wsum"], a["scale"], a["bias"]), (a["scale"], a["bias"])
    return None


_classes = _int8_kernel = None
