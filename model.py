"""
A hand-written Llama forward in plain PyTorch (Qwen2 is the same forward with biases on
the q, k and v projections), and its configuration from a Hugging Face config.json.

The forward is composable, because AdaDecode needs to stop a token half-way up the
stack and finish it later, batched with other tokens:

    h = model.embed(tokens)                          # (B, T, dim)
    h = model.run_layers(h, pos, cache, start, end)  # layers start..end-1, rows at pos..pos+T-1
    logits = model.logits(h)                         # final norm + LM head

Greedy decoding, early exit, deferred layers and verification all go through
`run_layers`; there is no second copy of the layer loop. Loading a checkpoint folder is
checkpoint.py's job, the int8, int4 and packed float32 linear layers quantize.py's.
"""
import hashlib
import json
import math
from dataclasses import dataclass, field
from types import MethodType

import torch
import torch.nn as nn
import torch.nn.functional as F

import fused
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


class Linear(nn.Linear):
    """nn.Linear, with decoding's few rows in C where fused.c runs (float32 on the CPU)."""

    def forward(self, x):
        if x.numel() <= ROW_BY_ROW * x.shape[-1] and fused.runs(x, self.weight, self.bias):
            # float32 on the CPU, a decoding call: in C, one pass over the weights for every row,
            # each output summed alone (fused.c, linear): faster than F.linear at a few rows, and
            # a row's result does not depend on how many rows share the call
            return fused.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if fused.runs(x, self.weight):           # float32 on the CPU: the same step in C, one call
            return fused.rms_norm(x, self.weight, self.eps)
        # x * rsqrt(mean(x^2) + eps) * weight, fused into one operator (a one-row call on the
        # Intel Xeon: 15 us, against 23 for the same steps written out, with the same bits).
        # bfloat16 is normalised in float32 (it loses too much in the mean of squares)
        if x.element_size() >= 4:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * self.weight

    def residual(self, x, y):
        """The residual add and this norm after it: (x + y, its norm)."""
        if fused.runs(x, y, self.weight):
            return fused.add_rms_norm(x, y, self.weight, self.eps)
        h = x + y
        return h, self(h)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.H, self.H_kv, self.D = args.n_heads, args.n_kv_heads, args.head_dim
        # q, k and v projections fused into one matmul: one weight read, one call
        self.wqkv = Linear(args.dim, (self.H + 2 * self.H_kv) * self.D, bias=args.qkv_bias)
        self.wo = Linear(self.H * self.D, args.dim, bias=False)

    def project(self, qkv, cos, sin):
        """q (B, T, H, D), k and v (B, H_kv, T, D) from the q/k/v projection's output qkv, rotary
        applied (cos and sin: (T, 1, D), from Transformer.new_cache)."""
        B, T, _ = qkv.shape
        H, H_kv, D = self.H, self.H_kv, self.D
        qk, v = qkv.split([(H + H_kv) * D, H_kv * D], dim=-1)
        qk = qk.view(B, T, H + H_kv, D)
        # rotary on q and k at once. Hugging Face's layout splits each head's dimensions in two
        # halves and rotates (x1, x2) -> (-x2, x1); rolling by D/2 swaps the halves, and the
        # minus sign sits in `sin` (Transformer.new_cache), so this is one op, not three
        qk = qk * cos + qk.roll(D // 2, dims=-1) * sin
        q, k = qk.split([H, H_kv], dim=2)
        return q, k.transpose(1, 2), v.view(B, T, H_kv, D).transpose(1, 2)

    def attend(self, qkv, pos, cache, layer, cos, sin):
        """Rows qkv (B, T, (H + 2*H_kv)*D), the q/k/v projection's output, at positions pos..:
        rotary, k and v written into `layer`'s cache, attention: (B, T, H*D)."""
        B, T, _ = qkv.shape
        decoding = T <= ROW_BY_ROW or pos > 0
        if decoding and B == 1 and fused.runs(qkv, cos, sin, cache.k):
            # float32 on the CPU: the steps below in C, one call (the same rotary and cache
            # write; each row's attention computed alone, as below)
            k_all, v_all = cache.claim(layer, pos, T)
            return fused.attention(qkv, cos, sin, k_all, v_all, pos, self.H, self.H_kv)
        q, k, v = self.project(qkv, cos, sin)
        H, D, H_kv = self.H, self.D, self.H_kv
        k, v = cache.append(layer, pos, k, v)         # (B, H_kv, S, D), S = pos + T
        # grouped-query attention without repeating KV heads: query head h reads KV head
        # h // G, so fold each group's G query heads into one KV head's rows
        G = H // H_kv
        if T == 1:
            # greedy's call, and most of AdaDecode's: the one-row case below without the list
            # and the slicing (the same kernel on the same tensors: the same bits; 2% of a
            # layer call on the CPU)
            return F.scaled_dot_product_attention(q.view(B, H_kv, G, D), k, v).reshape(B, 1, H * D)
        if decoding:
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
        self.w13 = Linear(args.dim, 2 * args.ffn_dim, bias=False)   # gate (w1) and up (w3) fused
        self.w2 = Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x):
        gate_up = self.w13(x)
        if fused.runs(gate_up):                   # float32 on the CPU: the line below in C
            return self.w2(fused.silu_mul(gate_up))
        gate, up = gate_up.split(self.ffn_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


def argmax(x):
    """x.argmax(-1): in C for float32 on the CPU (fused.argmax, the same indices), where
    PyTorch's compares one element at a time: 116 us against 17 over the default model's
    49,152 logits on the Intel Xeon, a greedy token's 1-2%."""
    return fused.argmax(x) if x.shape[-1] and fused.runs(x) else x.argmax(-1)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, pos, cache, layer, cos, sin):
        if x.shape[0] == 1 and x.shape[1] <= ROW_BY_ROW:
            # a decoding call in float32 or int8 on the CPU: the lines below in one C call, made
            # of the same C steps they call one by one (the same bits, 12 fewer calls from
            # Python); None where fused.c does not compute this block
            y = fused.block(self, x, pos, cache, layer, cos, sin)
            if y is not None:
                return y
        qkv = self.before_attention(x)
        y = self.attention.attend(qkv, pos, cache, layer, cos, sin)     # the cache's bookkeeping: plain Python
        return self.after_attention(x, y)

    # the two pure tensor parts of a block: what Transformer.compile_blocks compiles
    def before_attention(self, x):
        return self.attention.wqkv(self.attention_norm(x))

    def after_attention(self, x, y):
        h, h_normed = self.ffn_norm.residual(x, self.attention.wo(y))    # h = x + wo(y), and its norm
        return h + self.feed_forward(h_normed)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
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
        """torch.compile every block's two pure tensor parts (norm and q/k/v; o, the residuals,
        the MLP). Rotary, the cache's bookkeeping and the row-by-row attention stay in Python, so two graphs per part (one row; several, dynamic) serve every layer, and
        after a warm-up decoding recompiles nothing (test_model.py counts). float32 layers,
        packed or not, become plain nn.Linear first: Inductor plans its own matmuls (and
        fused.block, which only takes model.Linear, leaves the blocks to the compiled code)."""
        from quantize import PackedLinear       # here, not at the top: quantize.py builds on this file
        for module in list(self.modules()):
            for name, child in module.named_children():
                if isinstance(child, PackedLinear):
                    setattr(module, name, child.unpacked())
                elif type(child) is Linear:
                    plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                    plain.weight, plain.bias = child.weight, child.bias       # the same Parameters: a tie stays a tie
                    setattr(module, name, plain)
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
        T, end = h.shape[1], self.args.n_layers if end is None else end
        if h.shape[0] == 1 and T <= ROW_BY_ROW and start < end:
            # a decoding call in float32 or int8 on the CPU: every block below in one C call,
            # block() by block() (the same bits), the rotary tables read in place; None where
            # fused.c does not compute them all
            y = fused.layers(self, h, pos, cache, start, end)
            if y is not None:
                return y
        # (T, 1, D) copies, not views: compiled code would specialise on where a view starts
        cos, sin = self.rope_cos[pos:pos + T, None].clone(), self.rope_sin[pos:pos + T, None].clone()
        for i in range(start, end):
            h = self.layers[i](h, pos, cache, i, cos, sin)
        return h

    def logits(self, h):
        return self.output(self.norm(h))                         # (B, T, dim) -> (B, T, V)


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


if __name__ == "__main__":
    # the loader's command line is checkpoint.py's; `python model.py --prepare` still works
    import sys
    from checkpoint import main
    from cli import run_cli
    sys.exit(run_cli(main))
