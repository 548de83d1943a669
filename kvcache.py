"""
An explicit key/value cache with one filled length per layer.

Plain decoding keeps every layer at the same length. AdaDecode does not: while a token
that exited early waits for its deferred layers, the deeper layers lag behind the
shallow ones, and a rollback cuts them back. So each layer owns its length, the
buffers are allocated once for the maximum length, and truncation is a pointer move.
The decoding loop moves the lengths (through `append` and `truncate`); attention only
reads what it is given.

    cache = KVCache(n_layers=30, n_kv_heads=3, head_dim=64, max_len=2048)
"""
import torch


class KVCache:
    def __init__(self, n_layers, n_kv_heads, head_dim, max_len, dtype=torch.float32, device="cpu"):
        shape = (n_layers, 1, n_kv_heads, max_len, head_dim)  # (L, B=1, H_kv, S_max, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layer_k, self.layer_v = self.k.unbind(0), self.v.unbind(0)   # one view per layer, made once:
                                                                          # no indexing op per call
        self.lengths = [0] * n_layers
        self.max_len = max_len

    def append(self, layer, pos, k, v):
        """Write k, v (B, H_kv, T, D) at positions pos..pos+T-1 of `layer`; return the
        filled (B, H_kv, pos+T, D) views that attention reads."""
        T = k.shape[2]
        k_all, v_all = self.claim(layer, pos, T)
        k_all[:, :, pos:pos + T] = k
        v_all[:, :, pos:pos + T] = v
        return k_all[:, :, :pos + T], v_all[:, :, :pos + T]

    def claim(self, layer, pos, T):
        """Extend `layer` by positions pos..pos+T-1, which the caller then writes; return its
        whole (B, H_kv, max_len, D) buffers (fused.attention writes them in C)."""
        self.claim_layers(layer, layer + 1, pos, T)
        return self.layer_k[layer], self.layer_v[layer]

    def claim_layers(self, start, end, pos, T):
        """claim() for layers start..end-1, each checked before any is extended"""
        for layer in range(start, end):
            if pos != self.lengths[layer]:
                raise ValueError(f"layer {layer}: writing at position {pos}, but it holds {self.lengths[layer]} entries")
        if pos + T > self.max_len:
            which = f"layer {start} needs" if end == start + 1 else f"layers {start}-{end - 1} need"
            raise ValueError(f"KV cache overflow: {which} {pos + T} entries, allocated {self.max_len}")
        self.lengths[start:end] = [pos + T] * (end - start)

    def truncate(self, length, layer=None):
        """Forget everything at positions >= length, in one layer or in all of them."""
        for l in range(len(self.lengths)) if layer is None else [layer]:
            self.lengths[l] = min(self.lengths[l], length)

    def reset(self):
        self.truncate(0)

    def view(self, layer):
        """The filled (B, H_kv, n, D) keys and values of one layer."""
        n = self.lengths[layer]
        return self.layer_k[layer][:, :, :n], self.layer_v[layer][:, :, :n]
