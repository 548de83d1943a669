"""
Exit heads: a learnable d x d transform T at an intermediate layer, read out through
the model's own frozen final norm and LM head (AdaDecode, Wei et al. 2025):

    head_logits = lm_head(final_norm(T @ h))        # T starts as the identity: the "logit lens"

We apply the final RMSNorm after T (the paper does not say where it goes), so an
untrained head is exactly the logit lens and T only has to learn a correction.
A head set may add a Medusa-style residual block after T (Cai et al. 2024), a second
d x d matrix W, zero at the start so the head is still the logit lens:

    u = T @ h;  head_logits = lm_head(final_norm(u + silu(W @ u)))

(`train_heads.py --residual`; README, "The heads shipped for the default model").
A check returns a `Guess`: the head's top-1 token and a few cheap confidence features
(top-1 and top-2 probability, entropy, log-sum-exp of the logits). Whether to exit on
it is not the head's business: an exit policy (exits.py) decides.

The check is not free: on SmolLM2-135M the vocabulary projection reads as many bytes
as three layers. A head set may carry a shortlist (the K tokens the model emits most
often in the training responses); the check then projects onto those K rows only and
takes the softmax over them. That over-estimates confidence and misses tokens outside
the list, but a wrong early token costs only a rollback: verification keeps the output
exact whatever the head says.

A head set is a safetensors file: the transforms, the layers they sit after, a
fingerprint of the model they were trained for, and the training description and
evaluation figures (JSON in the metadata).

    heads = ExitHeads.load("heads/smollm2-135m-instruct.safetensors", model)
"""
import json
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import fused
from model import InputError, model_fingerprint
from quantize import Int8Linear, linear_rows


class Guess(NamedTuple):
    """What a head says about the next token, and how sure it looks (one host transfer)."""
    token: int
    p1: float          # top-1 probability (over the shortlist when the heads have one)
    p2: float          # top-2 probability
    entropy: float     # of the head's distribution, in nats
    lse: float         # log-sum-exp of the logits: low when little mass sits on the shortlist
    echo: int = 0      # filled in by the loop from the context, not by the head (exits.in_context):
    clash: int = 0     # the guess repeats (echo) or contradicts (clash) what followed the last k tokens before

    @property
    def margin(self):
        return self.p1 - self.p2


def check_layers(layers, n_layers):
    layers = list(layers)
    if not layers:
        raise InputError("at least one exit-head layer is needed")
    if any(not isinstance(l, int) or not 1 <= l <= n_layers for l in layers):
        raise InputError(f"exit-head layers must be integers in 1..{n_layers} (a head after layer l), got {layers}")
    if layers != sorted(set(layers)):
        raise InputError(f"exit-head layers must be strictly increasing, without duplicates, got {layers}")
    return layers


class ExitHeads(nn.Module):
    def __init__(self, model, layers, transforms=None, residual=None):
        """residual: None (no residual block), True (one per head, zero: trained from there)
        or the blocks' matrices (n_heads, d, d)."""
        super().__init__()
        self.layers = check_layers(layers, model.args.n_layers)
        self.index = {l: i for i, l in enumerate(self.layers)}
        self.n_layers = model.args.n_layers
        d = model.args.dim
        if transforms is None:
            transforms = torch.eye(d, dtype=model.dtype, device=model.device).repeat(len(self.layers), 1, 1)
        self.T = nn.Parameter(transforms.to(model.device, model.dtype))    # (n_heads, d, d)
        if residual is True:
            residual = torch.zeros_like(self.T)
        self.W = None if residual is None else nn.Parameter(residual.to(model.device, model.dtype))  # (n_heads, d, d) or None
        self._frozen = (model.norm, model.output)   # a tuple: not registered, not saved, not trained
        # on an int8 model the check runs T (and W) through the int8 kernel too (fixed there:
        # heads are trained on a float model)
        quantized = isinstance(model.output, Int8Linear)
        self._T8 = tuple(Int8Linear(t) for t in self.T) if quantized else None
        self._W8 = tuple(Int8Linear(w) for w in self.W) if quantized and self.W is not None else None
        self.fingerprint = model_fingerprint(model)
        self.meta = {}
        self.shortlist = self._short_ids = None

    def set_shortlist(self, token_ids):
        """Check confidence over these tokens only (None: the whole vocabulary)."""
        if token_ids is None:
            self.shortlist = self._short_ids = None
            return self
        output = self._frozen[1]
        self.shortlist = torch.as_tensor(token_ids, dtype=torch.long, device=self.T.device)
        self._short_out = (linear_rows(output, self.shortlist),)       # the LM head's K rows, copied once (a tuple: not registered)
        self._short_ids = self.shortlist.tolist()                       # index -> token id, on the host
        return self

    def transform(self, layer, h):
        """What the head after `layer` hands the final norm: T h, plus the residual block's
        silu(W T h) when the heads have one. On an int8 model, through the int8 kernel."""
        i = self.index[layer]
        u = self._T8[i](h) if self._T8 else h @ self.T[i].T
        if self.W is not None:
            u = u + F.silu(self._W8[i](u) if self._W8 else u @ self.W[i].T)
        return u

    def logits(self, layer, h):
        """Head logits (..., V) for hidden states h (..., d) after `layer`."""
        norm, output = self._frozen
        return output(norm(self.transform(layer, h)))

    @torch.no_grad()
    def features(self, layer, h):
        """(..., 5) float tensor [top-1 index, p1, p2, entropy, lse] for hidden states h (..., d).
        The index is into the shortlist when there is one. float32 on the CPU: all of it in one
        C call (fused.head_check), each row computed alone."""
        f = fused.head_check(self, layer, h)
        if f is not None:
            return f.view(h.shape[:-1] + (5,))
        norm, output = self._frozen
        project = output if self.shortlist is None else self._short_out[0]
        z = project(norm(self.transform(layer, h)))                        # (..., V) or (..., K)
        z = z.float() if z.element_size() < 4 else z                        # at least float32
        lse = torch.logsumexp(z, dim=-1)
        top, j = z.topk(min(2, z.shape[-1]), dim=-1)                        # (..., 2)
        p = torch.exp(top - lse[..., None])
        p2 = p[..., 1] if p.shape[-1] > 1 else torch.zeros_like(lse)
        entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
        return torch.stack([j[..., 0].to(z.dtype), p[..., 0], p2, entropy, lse], dim=-1)

    def check_weights(self):
        """What one check reads (modules and tensors): the transform, the residual block where
        there is one, and the projection it scores with (the shortlist's rows, or the LM head)."""
        parts = [self._T8[0] if self._T8 else self.T[0], self._frozen[1] if self.shortlist is None else self._short_out[0]]
        if self.W is not None:
            parts.append(self._W8[0] if self._W8 else self.W[0])
        return parts

    def _guess(self, f):
        j = int(f[0])
        return Guess(j if self._short_ids is None else self._short_ids[j], *f[1:])

    def check(self, layer, h):
        """The head after `layer` on one hidden state h (d,): a Guess, in one host transfer."""
        return self._guess(self.features(layer, h).tolist())

    def check_rows(self, layer, h):
        """Guesses for every row of h (N, d), batched (the simulator records traces with it)."""
        return [self._guess(f) for f in self.features(layer, h).tolist()]

    def save(self, path, **meta):
        from safetensors.torch import save_file
        self.meta.update(meta)
        info = {"layers": json.dumps(self.layers), "fingerprint": self.fingerprint, "meta": json.dumps(self.meta)}
        tensors = {"T": self.T.detach().float().cpu().contiguous()}
        if self.W is not None:
            tensors["W"] = self.W.detach().float().cpu().contiguous()
        if self.shortlist is not None:
            tensors["shortlist"] = self.shortlist.cpu()
        tmp = f"{path}.tmp{os.getpid()}"              # written whole, then renamed: never half a file
        try:
            save_file(tensors, tmp, metadata=info)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path, model):
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                info, T = f.metadata() or {}, f.get_tensor("T")
                shortlist = f.get_tensor("shortlist") if "shortlist" in f.keys() else None
                W = f.get_tensor("W") if "W" in f.keys() else None
        except FileNotFoundError:
            raise InputError(f"{path}: no such heads file") from None
        except Exception as e:   # safetensors raises its own error types
            raise InputError(f"{path}: not a heads file ({str(e).splitlines()[0][:200]})") from None
        if "layers" not in info or "fingerprint" not in info:
            raise InputError(f"{path}: not a heads file (no layers or fingerprint in its metadata)")
        if info["fingerprint"] != model_fingerprint(model):
            raise InputError(f"{path}: these heads were trained for another model "
                             f"(fingerprint {info['fingerprint']}, this model's is {model_fingerprint(model)})")
        try:
            layers, meta = json.loads(info["layers"]), json.loads(info.get("meta", "{}"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: its metadata is not valid JSON ({e})") from None
        if not isinstance(layers, list) or not isinstance(meta, dict):
            raise InputError(f"{path}: its metadata has no list of layers or no meta object")
        d = model.args.dim
        if T.dim() != 3 or tuple(T.shape[1:]) != (d, d) or T.shape[0] != len(layers) or not T.is_floating_point():
            raise InputError(f"{path}: {len(layers)} layers need transforms of shape ({len(layers)}, {d}, {d}), "
                             f"the file has {tuple(T.shape)} {T.dtype}")
        if not torch.isfinite(T).all():
            raise InputError(f"{path}: its transforms hold NaN or infinite values")
        if W is not None and (W.shape != T.shape or not W.is_floating_point() or not torch.isfinite(W).all()):
            raise InputError(f"{path}: the residual blocks W must be finite and shaped like the transforms "
                             f"{tuple(T.shape)}, the file has {tuple(W.shape)} {W.dtype}")
        if shortlist is not None and (shortlist.dim() != 1 or shortlist.dtype != torch.long or len(shortlist) < 1 or
                                      shortlist.min() < 0 or shortlist.max() >= model.args.vocab_size):
            raise InputError(f"{path}: the shortlist must be token ids in [0, {model.args.vocab_size}), "
                             f"the file has {tuple(shortlist.shape)} {shortlist.dtype}")
        heads = cls(model, layers, T.to(model.device), None if W is None else W.to(model.device))
        heads.meta = meta
        heads.set_shortlist(shortlist)
        if "policy" in meta:
            from exits import from_spec
            from_spec(meta["policy"], model.args.n_layers)       # a bad spec fails now, not mid-generation
        return heads.requires_grad_(False)
