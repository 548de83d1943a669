"""
The linear layers a CPU decodes fastest with, and the conversions that put them in a
loaded model: weight-only int8 (Int8Linear, quantize_int8), 4-bit groups (Int4Linear,
quantize_int4; lossless for weights that were 4-bit already, int4_is_lossless), and
float32 reordered for oneDNN (PackedLinear, pack_float32, where it is faster on this CPU).
Each keeps the residual stream, norms and attention in float32 and changes only how a
matrix is stored and multiplied. In int8 and int4 a row's result is bit-identical whatever
the number of rows in its call: AdaDecode is then bit for bit greedy (README, "int8 and
int4 on the CPU"). checkpoint.load_model calls these; nothing here reads files.
"""
import time

import torch
import torch.nn as nn

import fused
from int8mm import MAX_K, int8mm, int8mm_op, pack, unpack
from model import InputError, model_fingerprint


def int8_grid(weight):
    """weight (N, K) as int8 values in -127..127 times one float32 scale per output row:
    (wq, scale)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-30)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A linear layer with weight-only int8 quantisation: W ~= Wq * scale, one scale per output
    row, multiplied by int8mm (int8mm.py: each row of activations as 16-bit integers, about 15
    bits, and integer dot products; Wq stored in the kernel's tiles). The residual stream,
    norms and attention around it stay in float32. It reads a quarter of float32's bytes, and
    its result for a row is bit-identical whatever the number of rows in the call, which
    float32's F.linear does not promise."""

    def __init__(self, weight, bias=None):
        super().__init__()
        wq, scale = int8_grid(weight)
        self.in_features = wq.shape[1]
        self.register_buffer("wp", pack(wq))
        self.register_buffer("scale", scale)
        self.register_buffer("wsum", wq.sum(1, dtype=torch.int32))           # the kernel's correction term
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @property
    def wq(self):
        """The int8 weights (N, K), unpacked."""
        return unpack(self.wp, len(self.scale), self.in_features)

    def forward(self, x):
        mm = int8mm_op if torch.compiler.is_compiling() else int8mm
        return mm(x, self.wp, self.wsum, self.scale, self.bias)

    def rows(self, ids):
        """The same layer restricted to output rows `ids` (an exit head's shortlist)."""
        sub = Int8Linear(torch.zeros(1, self.in_features))
        sub.wp, sub.scale, sub.wsum = pack(self.wq[ids]), self.scale[ids].contiguous(), self.wsum[ids].contiguous()
        sub.bias = None if self.bias is None else self.bias[ids].contiguous()
        return sub


def int4_grid(weight, group=32):
    """Round each group of `group` consecutive inputs of each row of weight (N, K) to 16
    levels of its own: W ~= (q - 8) * scale + zero, q in 0..15, scale and zero (N, K/group)
    rounded to bfloat16, as Int4Linear's kernel reads them. The grid spans the group's min to max,
    which is how a 4-bit GGUF file (Q4_1, Q4_K) stores weights: a checkpoint converted
    from one already sits on this grid, and rounding to it finds it again."""
    w = weight.detach().float()
    n, k = w.shape
    w = w.view(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-30)
    q = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15)   # a 4-bit file's own integers, exactly
    # then scale and zero are rounded to bfloat16 (half the error of rounding q on the rounded grid)
    return q.view(n, k).to(torch.int32), scale.to(torch.bfloat16).float(), (lo + 8 * scale).to(torch.bfloat16).float()


def rounding_error(weight, bits):
    """Relative (Frobenius) error of storing weight in int8 (per output row) or in int4 (per
    group of 32 inputs), the way Int8Linear and Int4Linear store it."""
    w = weight.detach().float()
    if bits == 8:
        wq, scale = int8_grid(w)
        approx = wq.float() * scale.float()[:, None]
    else:
        q, scale, zero = int4_grid(w)
        n, k = w.shape
        approx = ((q.view(n, -1, 32) - 8) * scale[..., None] + zero[..., None]).view(n, k)
    return float((approx - w).norm() / w.norm().clamp(min=1e-30))


class Int4Linear(nn.Module):
    """A linear layer with weight-only 4-bit quantisation: every group of 32 inputs of a
    row on its own 16-level grid (int4_grid), packed two to a byte for the CPU kernel:
    five eighths of int8's bytes with the scales and zeros. aten's kernel takes bfloat16
    activations, so x is rounded to bfloat16 at its input (float32 around it), and gives the
    same guarantee as int8: a row's result is bit-identical whatever the number of rows in
    the call. Lossy for ordinary weights (about 8% error, int8's is about 1%), lossless
    up to bfloat16's rounding of the grid for weights that were 4-bit already (the default
    model's: 0.2%). The kernel needs N a multiple of 16 and K of 32."""

    GROUP = 32

    def __init__(self, weight, bias=None):
        super().__init__()
        q, scale, zero = int4_grid(weight, self.GROUP)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scale_zero", torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.packed,
                                                       self.GROUP, self.scale_zero)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def linear_rows(linear, ids):
    """A linear layer (nn.Linear, PackedLinear or Int8Linear) restricted to output rows `ids`."""
    if isinstance(linear, Int8Linear):
        return linear.rows(ids)
    if isinstance(linear, PackedLinear):
        return PackedLinear(linear.weight[ids].contiguous(), None if linear.bias is None else linear.bias[ids])
    sub = type(linear)(linear.in_features, len(ids), bias=linear.bias is not None, device="meta")
    sub.weight = nn.Parameter(linear.weight[ids].contiguous(), requires_grad=False)
    if linear.bias is not None:
        sub.bias = nn.Parameter(linear.bias[ids].contiguous(), requires_grad=False)
    return sub


class PackedLinear(nn.Module):
    """float32 on the CPU: the same weights, reordered once into oneDNN's blocked layout
    and multiplied by its kernel. Whether that beats F.linear depends on the CPU: on this
    project's AMD EPYC a one-row product reads the weights 1.5x as fast, and 2, 3 or 4 rows
    cost hardly more than one (F.linear: 1.3-1.5x), which is where AdaDecode's calls are;
    on its Intel Xeon (AMX) F.linear is faster for every matrix. So pack_float32 times both
    at load time. Same float32 numbers, another summation order. The LM head keeps a
    reference to its dense matrix too (the tied embedding, the heads' shortlist rows and
    their training read it)."""

    def __init__(self, weight, bias=None, keep_weight=False):
        super().__init__()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.weight = weight if keep_weight else None       # not registered: the embedding owns it

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def unpacked(self):
        """The plain nn.Linear with the same weights (torch.compile cannot read packed ones)."""
        lin = nn.Linear(self.packed.shape[1], self.packed.shape[0], bias=self.bias is not None, device="meta")
        w = self.weight if self.weight is not None else self.packed.to_dense()
        lin.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)   # a tie stays a tie
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias, requires_grad=False)
        return lin


def pack_unsupported(model):
    """Why pack_float32 cannot run this model here (a string), or None when it can."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return "packs float32 weights on the CPU only"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return f"needs oneDNN's linear kernels, missing from torch {torch.__version__}"
    return None


def time_packing(pairs, rows=(1, 3), repeats=3):
    """Seconds to multiply through every (dense, packed) pair of linear layers, all of them
    in turn as a decoding step does, for 1 and 3 rows (greedy's call, and a typical one of
    AdaDecode's) summed, the two kernels interleaved, the median of `repeats`: (dense, packed)."""
    times = ([], [])
    for rep in range(repeats):
        for kind in (0, 1) if rep % 2 else (1, 0):
            t = time.perf_counter()
            for r in rows:
                x = {}
                for pair in pairs:
                    k = pair[0].in_features
                    pair[kind](x.setdefault(k, torch.ones(1, r, k)))
            times[kind].append(time.perf_counter() - t)
    return tuple(sorted(ts)[len(ts) // 2] for ts in times)


def pack_float32(model, always=False):
    """Replace every linear layer by a PackedLinear, in place, when oneDNN's packed kernel
    is clearly faster than model.Linear on this CPU (fused.c's loop where it is built, else
    F.linear; at least 10%: near a tie the plain path stays, and the choice does not flip
    from run to run), timed on the model's own matrices (time_packing; 1.3 s for the
    default model), or always. The timings and
    the choice go to model.packing. float32 on the CPU only; load_model does this by
    default (pack=True packs whatever the timing, pack=False never)."""
    why = pack_unsupported(model)
    if why:
        raise InputError(why)
    model.fingerprint = model_fingerprint(model)
    linears = [(module, name, child) for module in list(model.modules())
               for name, child in module.named_children() if isinstance(child, nn.Linear)]
    packed = [PackedLinear(c.weight, c.bias, keep_weight=c is model.output) for _, _, c in linears]
    dense_s, packed_s = time_packing([(c, p) for (_, _, c), p in zip(linears, packed)])
    model.packing = {"packed": always or packed_s < 0.9 * dense_s, "dense_seconds": dense_s, "packed_seconds": packed_s,
                     "dense": "fused.c" if fused.runs(model.output.weight) else "F.linear"}
    if model.packing["packed"]:
        for (module, name, _), p in zip(linears, packed):
            setattr(module, name, p)
    return model


def int8_unsupported(model):
    """Why quantize_int8 cannot run this model here (a string), or None when it can."""
    if model.device.type != "cpu":
        return f"runs on the CPU only (this model is on {model.device}); use float32 on a GPU"
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        return "quantises a model's float weights; this one is packed (load it with pack=False)"
    widths = sorted({m.in_features for m in model.modules() if isinstance(m, nn.Linear)})
    if widths and widths[-1] > MAX_K:
        return f"takes linear layers of at most {MAX_K} inputs (int32 sums); this model has {widths[-1]}"
    return None


def quantize_int8(model):
    """Replace every linear layer (q/k/v, o, gate/up, down, the LM head) by an Int8Linear,
    in place. The embedding stays float32 (a lookup reads one row). CPU only: the kernel's
    CUDA support differs between builds and is untested here."""
    why = int8_unsupported(model)
    if why:
        raise InputError(f"--dtype int8: {why}")
    model.fingerprint = model_fingerprint(model)      # of the float weights: heads trained on them still fit
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child.weight, child.bias))
    return model


def block_linears(model):
    """The linear layers inside the transformer blocks (q/k/v, o, gate/up, down)."""
    return [m for blk in model.layers for m in blk.modules() if isinstance(m, nn.Linear)]


def int4_unsupported(model):
    """Why quantize_int4 cannot run this model here (a string), or None when it can."""
    if model.device.type != "cpu":
        return f"runs on the CPU only (this model is on {model.device}); use float32 on a GPU"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"needs torch.ops.aten._weight_int4pack_mm_for_cpu, missing from torch {torch.__version__}"
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        return "quantises a model's float weights; this one is packed (load it with pack=False)"
    shapes = sorted({(m.out_features, m.in_features) for m in block_linears(model)})
    if any(n % 16 or k % Int4Linear.GROUP for n, k in shapes):
        return f"needs every block's linear layers to have a multiple of 16 outputs and of 32 inputs; this model has {shapes}"
    return None


def int4_is_lossless(model):
    """Whether 4 bits lose no more of this model's weights than int8 would: every block's
    matrix must round to int4 with at most int8's error. True for a checkpoint converted
    from a 4-bit GGUF file (the default model: 0.2% against 0.9%), false for ordinary
    float weights (about 8% against 1%). adadecode.setup's default uses it."""
    return all(rounding_error(m.weight, 4) <= rounding_error(m.weight, 8) for m in block_linears(model))


def quantize_int4(model):
    """Replace every block's linear layer by an Int4Linear and the LM head by an Int8Linear,
    in place (CPU only). The LM head stays 8-bit: a 4-bit GGUF file keeps its embedding in
    8 bits (the default model's is Q8_0), and the exit heads' checks read its rows."""
    why = int4_unsupported(model)
    if why:
        raise InputError(f"--dtype int4: {why}")
    model.fingerprint = model_fingerprint(model)
    for blk in model.layers:
        for module in list(blk.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    setattr(module, name, Int4Linear(child.weight, child.bias))
    model.output = Int8Linear(model.output.weight)
    return model


def precision(model):
    """The model's numeric mode as the command lines name it: "int4", "int8", "float32", ..."""
    if isinstance(model.layers[0].attention.wqkv, Int4Linear):
        return "int4"
    if isinstance(model.output, Int8Linear):
        return "int8"
    return str(model.dtype).removeprefix("torch.")
