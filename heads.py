"""
Exit heads: a learnable d x d transform T at an intermediate layer, read out through
the model's own frozen final norm and LM head (AdaDecode, Wei et al. 2025):

    head_logits = lm_head(final_norm(T @ h))        # T starts as the identity: the "logit lens"

We apply the final RMSNorm after T (the paper does not say where it goes), so an
untrained head is exactly the logit lens and T only has to learn a correction.
Confidence is the head's top-1 softmax probability.

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
import hashlib
import json

import torch
import torch.nn as nn

from model import InputError


def model_fingerprint(model):
    """A short hash of the config and a few weights: heads refuse any other model.
    Weights are hashed at bfloat16 precision so the same checkpoint loaded in
    float32, float64 or bfloat16 gives the same fingerprint."""
    a = model.args
    sig = hashlib.sha256(json.dumps([a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.ffn_dim]).encode())
    for w in (model.tok_embeddings.weight[:64], model.norm.weight, model.layers[0].attention.wqkv.weight[:64]):
        sig.update(w.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return sig.hexdigest()[:16]


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
    def __init__(self, model, layers, transforms=None):
        super().__init__()
        self.layers = check_layers(layers, model.args.n_layers)
        self.index = {l: i for i, l in enumerate(self.layers)}
        d, w = model.args.dim, model.output.weight
        if transforms is None:
            transforms = torch.eye(d, dtype=w.dtype, device=w.device).repeat(len(self.layers), 1, 1)
        self.T = nn.Parameter(transforms.to(w.dtype))                   # (n_heads, d, d)
        self._frozen = (model.norm, model.output)   # a tuple: not registered, not saved, not trained
        self.fingerprint = model_fingerprint(model)
        self.meta = {}
        self.shortlist = None

    def set_shortlist(self, token_ids):
        """Check confidence over these tokens only (None: the whole vocabulary)."""
        if token_ids is None:
            self.shortlist = None
            return self
        w = self._frozen[1].weight
        self.shortlist = torch.as_tensor(token_ids, dtype=torch.long, device=w.device)
        self._short_w = w[self.shortlist].contiguous()                  # (K, d): read in place by the check
        return self

    def logits(self, layer, h):
        """Head logits (..., V) for hidden states h (..., d) after `layer`."""
        norm, output = self._frozen
        return output(norm(h @ self.T[self.index[layer]].T))

    @torch.no_grad()
    def predict(self, layer, h):
        """(token, confidence) of the head after `layer` for one hidden state h (d,)."""
        if self.shortlist is None:
            z = self.logits(layer, h)                                       # (V,)
        else:
            norm = self._frozen[0]
            z = norm(h @ self.T[self.index[layer]].T) @ self._short_w.T    # (K,)
        p = torch.softmax(z.float() if z.element_size() < 4 else z, dim=-1)   # at least float32
        conf, j = p.max(dim=-1)
        tok = j if self.shortlist is None else self.shortlist[j]
        return int(tok), float(conf)

    def save(self, path, **meta):
        from safetensors.torch import save_file
        self.meta.update(meta)
        info = {"layers": json.dumps(self.layers), "fingerprint": self.fingerprint, "meta": json.dumps(self.meta)}
        tensors = {"T": self.T.detach().float().cpu().contiguous()}
        if self.shortlist is not None:
            tensors["shortlist"] = self.shortlist.cpu()
        save_file(tensors, str(path), metadata=info)

    @classmethod
    def load(cls, path, model):
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                info, T = f.metadata() or {}, f.get_tensor("T")
                shortlist = f.get_tensor("shortlist") if "shortlist" in f.keys() else None
        except FileNotFoundError:
            raise InputError(f"{path}: no such heads file")
        except Exception as e:
            raise InputError(f"{path}: not a heads file ({e})")
        if "layers" not in info or "fingerprint" not in info:
            raise InputError(f"{path}: not a heads file (no layers or fingerprint in its metadata)")
        if info["fingerprint"] != model_fingerprint(model):
            raise InputError(f"{path}: these heads were trained for another model "
                             f"(fingerprint {info['fingerprint']}, this model's is {model_fingerprint(model)})")
        w = model.output.weight
        heads = cls(model, json.loads(info["layers"]), T.to(w.device))
        heads.meta = json.loads(info.get("meta", "{}"))
        heads.set_shortlist(shortlist)
        return heads.requires_grad_(False)
