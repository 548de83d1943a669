"""fused.c, a layer's steps in C for float32 on the CPU, against their PyTorch definitions in
model.py: the rotary step, the cache write and the residual add bit for bit, the linear
layer, the norms, attention and silu within a few units in the last place (and closer to
float64 than bfloat16 could be); every row computed alone (a row's bits do not depend on its
call); a whole block in one call gives the steps' bits; NaN and inf rows stay NaN; where
fused.c cannot be built, the PyTorch steps run and one line says so.

    pytest -q test_fused.py
"""
import subprocess
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import cbuild
import fused
from conftest import assert_close, random_llama
from kvcache import KVCache
import model
from model import ROW_BY_ROW, Attention, Linear, ModelArgs, RMSNorm
from quantize import quantize_int8


def data(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def twice(fn):
    """fn() with fused.c, and with the PyTorch definitions."""
    with torch.inference_mode():
        got = fn()
        with fused.off():
            want = fn()
    return got, want


@given(n=st.integers(1, 1100), rows=st.integers(1, 9), scale=st.sampled_from([1e-6, 1e-2, 1.0, 30.0, 1e4]),
       seed=st.integers(0, 10**6))
def test_norms_and_the_residual_add(n, rows, scale, seed):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(n, 1e-5).requires_grad_(False)
    norm.weight.copy_(1 + 0.3 * data(g, n))
    x, y = data(g, 1, rows, n, scale=scale), data(g, 1, rows, n, scale=scale)
    x[..., 0] *= 50                                                      # an outlier feature
    (got, (h, hn)), (want, (wh, whn)) = twice(lambda: (norm(x), norm.residual(x, y)))
    assert torch.equal(h, wh) and torch.equal(h, x + y)                 # the add: PyTorch's bits
    exact = lambda v: v.double() * torch.rsqrt(v.double().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    for ours, theirs, v in ((got, want, x), (hn, whn, h)):
        assert_close(ours, theirs, atol=0, rtol=8e-7, what="RMSNorm in C against PyTorch")   # (its own error: to 3.2e-7)
        assert_close(ours, exact(v), atol=0, rtol=3e-7, what="RMSNorm in C against float64")


@given(K=st.integers(1, 1100), N=st.integers(1, 41), rows=st.integers(1, ROW_BY_ROW), bias=st.booleans(),
       scale=st.sampled_from([1e-6, 1.0, 1e4]), seed=st.integers(0, 10**6))
def test_the_linear_layer(K, N, rows, bias, scale, seed):
    """model.Linear at decoding's few rows, in C: within the float32 rounding of its sums of
    K products against float64 (F.linear's own error is of the same kind), each row's bits
    those of its one-row call, and at more rows than ROW_BY_ROW, F.linear."""
    g = torch.Generator().manual_seed(seed)
    lin = Linear(K, N, bias=bias).requires_grad_(False)
    lin.weight.copy_(data(g, N, K, scale=K ** -0.5))
    if bias:
        lin.bias.copy_(data(g, N))
    x = data(g, 1, rows, K, scale=scale)
    x[..., 0] *= 50                                                      # an outlier feature
    with torch.inference_mode():
        assert fused.runs(x, lin.weight, lin.bias)
        got = lin(x)
        for t in range(rows):
            assert torch.equal(got[:, t:t + 1], lin(x[:, t:t + 1].contiguous()))
        more = x.repeat(1, ROW_BY_ROW // rows + 1, 1)
        assert torch.equal(lin(more), F.linear(more, lin.weight, lin.bias))
    exact = x.double() @ lin.weight.double().T + (lin.bias.double() if bias else 0)
    # a sum of K terms in 16 lanes, the lanes pairwise, then the tail: at most K/16 + 19 roundings
    # of partial sums each bounded by sum |w x| (and the bias)
    size = x.double().abs() @ lin.weight.double().abs().T + (lin.bias.double().abs() if bias else 0)
    assert ((got.double() - exact).abs() <= (K // 16 + 20) * 2.0 ** -24 * size + 1e-30).all()


def attention_layer(H_kv, G, D, seed):
    args = ModelArgs(dim=8, n_layers=1, n_heads=H_kv * G, n_kv_heads=H_kv, vocab_size=8, ffn_dim=8, head_dim=D)
    return Attention(args).requires_grad_(False)


def rotary_table(g, n, D):
    """cos and sin rows (n, 1, D) as Transformer.new_cache lays them out (sin's first half negated)."""
    angle = data(g, n, 1, D // 2, scale=3.0).repeat(1, 1, 2)
    half = torch.cat([-torch.ones(D // 2), torch.ones(D // 2)])
    return angle.cos().contiguous(), (angle.sin() * half).contiguous()


@given(H_kv=st.integers(1, 3), G=st.integers(1, 9), D=st.sampled_from([2, 6, 8, 16, 24, 64, 80, 128]),
       pos=st.integers(0, 300), T=st.integers(1, 7), scale=st.sampled_from([0.1, 1.0, 4.0]), seed=st.integers(0, 10**6))
def test_decoding_attention(H_kv, G, D, pos, T, scale, seed):
    """Attention.attend on T decoding rows after `pos` cached ones: the cache afterwards
    holds PyTorch's rotated keys and values bit for bit, and each row's output is within
    float64 about as closely as scaled_dot_product_attention's (peaked scores amplify
    float32's rounding of them in both)."""
    g = torch.Generator().manual_seed(seed)
    att = attention_layer(H_kv, G, D, seed)
    H = H_kv * G
    qkv = data(g, 1, pos + T, (H + 2 * H_kv) * D, scale=scale)
    cos, sin = rotary_table(g, pos + T, D)
    caches = []

    def run():
        cache = KVCache(1, H_kv, D, pos + T + 2)
        with fused.off():                                    # the same cached prefix for both
            if pos:
                att.attend(qkv[:, :pos], 0, cache, 0, cos[:pos], sin[:pos])
        caches.append(cache)
        return att.attend(qkv[:, pos:], pos, cache, 0, cos[pos:], sin[pos:])

    got, want = twice(run)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert caches[0].lengths == caches[1].lengths == [pos + T]
    # float64 on the same cached keys and values
    q = att.project(qkv[:, pos:].double(), cos[pos:].double(), sin[pos:].double())[0]
    k, v = caches[1].view(0)
    exact = torch.cat([F.scaled_dot_product_attention(q[:, t].reshape(1, H_kv, G, D), k[:, :, :pos + t + 1].double(),
                                                      v[:, :, :pos + t + 1].double()).reshape(1, 1, H * D)
                       for t in range(T)], 1)
    ours, theirs = (got.double() - exact).abs().max().item(), (want.double() - exact).abs().max().item()
    # a score's float32 rounding, |q|.|k| * scale * 2^-24, moves the output by up to twice that
    # times the largest value (both kernels' error is mostly this, and large scores amplify it)
    scores = max((q[:, t].reshape(H_kv, G, D).abs() @ k[0, :, :pos + t + 1].double().abs().transpose(1, 2)).max().item()
                 for t in range(T)) * D ** -0.5
    rounding = 2 * 2.0 ** -24 * scores * v.abs().max().item()
    assert ours <= max(4 * theirs, rounding + 1e-6 * exact.abs().max().item() + 1e-7), \
        f"attention in C is {ours:.2e} from float64, PyTorch's kernel {theirs:.2e}"


@pytest.mark.parametrize("split", [None, 1, 2])
def test_the_same_bits_from_any_build(tmp_path, split):
    """fused.c's sums are in a fixed order and its multiply-adds are C's fmaf (one rounding by
    definition), so a build for a plain x86-64 or any other CPU, without OpenMP, gives the bits
    of this CPU's build: attention (16-key scores, fused multiply-adds) and the linear layer.
    So does either way of holding 16 lanes (SPLIT: one vector, as AVX-512 builds do, or two of
    8, as AVX2 builds do), whichever this CPU's build uses."""
    path, why = cbuild.build(fused.SOURCE, tries=[[] if split is None else [f"-DSPLIT={split}"]], folder=tmp_path)
    assert path is not None, why
    plain, native = fused.load(path), fused.library()
    g = torch.Generator().manual_seed(0)
    for D, G, pos, T in ((64, 3, 300, 1), (64, 3, 37, 7), (24, 2, 5, 3), (128, 1, 100, 2), (80, 4, 16, 4)):
        qkv = data(g, 1, T, (2 * G + 4) * D, scale=3.0)
        cos, sin = rotary_table(g, T, D)
        k, v = data(g, 1, 2, pos + T + 4, D), data(g, 1, 2, pos + T + 4, D)
        x, w = data(g, T, 1100), data(g, 41, 1100)
        outs = []
        for lib in (native, plain):
            with mock.patch.object(fused, "_lib", lib):
                kc, vc = k.clone(), v.clone()
                outs.append((fused.attention(qkv, cos, sin, kc, vc, pos, 2 * G, 2), kc, vc, fused.linear(x, w, None)))
        assert all(torch.equal(a, b) for a, b in zip(*outs))


@given(rows=st.integers(2, 9), pos=st.integers(0, 200), G=st.integers(1, 9), D=st.sampled_from([16, 64, 128]),
       seed=st.integers(0, 10**6))
def test_each_row_is_computed_alone(rows, pos, G, D, seed):
    """A row's bits do not depend on the other rows in its call: one call on `rows` decoding
    rows equals `rows` one-row calls, for attention, the norm with its residual add, and silu.
    (With D a multiple of 64 and G of at least 3, a KV head's values are summed for three
    query heads at once, values3, in two halves of D; the rest of G head by head, values1.)"""
    g = torch.Generator().manual_seed(seed)
    H_kv = 2
    att = attention_layer(H_kv, G, D, seed)
    qkv = data(g, 1, pos + rows, (H_kv * G + 2 * H_kv) * D)
    cos, sin = rotary_table(g, pos + rows, D)
    norm = RMSNorm(40, 1e-5).requires_grad_(False)
    x, y, gu = data(g, 1, rows, 40), data(g, 1, rows, 40), data(g, 1, rows, 22, scale=8.0)
    with torch.inference_mode():
        assert fused.runs(qkv, x, gu)
        a, b = KVCache(1, H_kv, D, pos + rows), KVCache(1, H_kv, D, pos + rows)
        for cache in (a, b):
            att.attend(qkv[:, :pos], 0, cache, 0, cos[:pos], sin[:pos]) if pos else None
        together = att.attend(qkv[:, pos:], pos, a, 0, cos[pos:], sin[pos:])
        alone = torch.cat([att.attend(qkv[:, pos + t:pos + t + 1], pos + t, b, 0, cos[pos + t:pos + t + 1],
                                      sin[pos + t:pos + t + 1]) for t in range(rows)], 1)
        assert torch.equal(together, alone) and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
        for t in range(rows):
            one = slice(t, t + 1)
            assert torch.equal(norm.residual(x, y)[1][:, one], norm.residual(x[:, one], y[:, one])[1])
            assert torch.equal(fused.silu_mul(gu)[:, one], fused.silu_mul(gu[:, one].contiguous()))


@given(arch=st.sampled_from(["llama", "qwen2"]), int8=st.booleans(), rows=st.integers(1, ROW_BY_ROW),
       pos=st.integers(0, 300), seed=st.integers(0, 10**6))
def test_a_block_in_one_call_is_its_steps(arch, int8, rows, pos, seed):
    """fused.block, a TransformerBlock's forward in one C call, gives the bits of its steps
    called one by one (the same functions in the same order), the cache's too, for Llama and
    Qwen2 (q/k/v biases), float32 and int8, prompts and decoding calls; and it runs only where
    every linear layer is a model.Linear or an Int8Linear."""
    net = random_llama(seed % 1000, dtype=torch.float32, n_layers=2, n_heads=4, n_kv_heads=2, dim=32, ffn=48,
                       max_pos=400, arch=arch)
    net = quantize_int8(net) if int8 else net
    h = torch.randn(1, pos + rows, 32, generator=torch.Generator().manual_seed(seed))
    outs = []
    with torch.inference_mode():
        for run, one in ((True, True), (False, True), (False, False)):   # all layers in one call, block by block, steps
            cache = net.new_cache(pos + rows)
            net.run_layers(h[:, :pos], 0, cache) if pos else None
            with mock.patch.object(fused, "layers", fused.layers if run else lambda *a: None), \
                    mock.patch.object(fused, "block", fused.block if one else lambda *a: None):   # None: not in C
                outs.append((net.run_layers(h[:, pos:], pos, cache), cache.k.clone(), cache.v.clone()))
        assert fused.block(net.layers[0], h[:, :1], 0, net.new_cache(1), 0, net.rope_cos[:1, None].clone(),
                           net.rope_sin[:1, None].clone()) is not None
        net.layers[0].feed_forward.w2 = torch.nn.Linear(48, 32, bias=False)     # not model.Linear: the steps run
        assert fused.block(net.layers[0], h[:, :1], 0, net.new_cache(1), 0, net.rope_cos[:1, None].clone(),
                           net.rope_sin[:1, None].clone()) is None
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*outs))


def test_a_run_of_layers_in_one_call():
    """fused.layers, the blocks of model.run_layers in one C call, gives block() by block()'s
    bits for any run of layers and rows, and the cache's lengths; where it cannot (a block
    with a forward hook, or of a subclass with its own forward), the blocks' forwards run."""
    net = quantize_int8(random_llama(3, dtype=torch.float32, n_layers=4, n_heads=4, n_kv_heads=2, dim=32, ffn=48,
                                     max_pos=64))
    h = torch.randn(1, 20, 32, generator=torch.Generator().manual_seed(0))
    for start, end, rows in ((0, 4, 1), (1, 3, 5), (2, 3, 2), (3, 4, ROW_BY_ROW)):
        outs = []
        with torch.inference_mode():
            for run in (True, False):
                cache = net.new_cache(20)
                net.run_layers(h[:, :12], 0, cache)
                cache.truncate(12, None)
                with mock.patch.object(fused, "layers", fused.layers if run else lambda *a: None):
                    outs.append((net.run_layers(h[:, 12:12 + rows], 12, cache, start, end), cache.k.clone(),
                                 cache.v.clone(), list(cache.lengths)))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        assert torch.equal(outs[0][2], outs[1][2]) and outs[0][3] == outs[1][3]
    seen = []
    net.layers[2].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.inference_mode():
        assert fused.layers(net, h[:, 12:13], 12, net.new_cache(20), 0, 4) is None
        cache = net.new_cache(20)
        net.run_layers(h[:, :13], 0, cache)
        net.run_layers(h[:, 13:14], 13, cache)
    assert seen == [(1, 13, 32), (1, 1, 32)]


def test_the_arguments_made_once_follow_the_model():
    """The C arguments fused.py keeps per block (its weights' addresses) are made again
    whenever the model changes under them: a weight moved (`.data =`, as in_huge_pages does),
    a parameter or a module assigned, a norm's eps set; a weight changed in place needs
    nothing. After each change the output is what a model built that way from the start
    gives."""
    torch.manual_seed(0)
    net = random_llama(4, dtype=torch.float32, n_layers=2, n_heads=4, n_kv_heads=2, dim=32, ffn=48, max_pos=64)
    h = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(1))

    def decode():
        with torch.inference_mode():
            cache = net.new_cache(9)
            net.run_layers(h[:, :8], 0, cache)
            return net.run_layers(h[:, 8:], 8, cache)

    def fresh():                     # the same model, no plan kept: what the output must be
        fused._plans.clear()
        return decode()

    blk = net.layers[1]
    changes = [lambda: setattr(blk.attention.wo.weight, "data", torch.randn(32, 32)),
               lambda: blk.feed_forward.w2.weight.mul_(2),
               lambda: setattr(blk.feed_forward.w13, "weight", torch.nn.Parameter(torch.randn(96, 32),
                                                                                  requires_grad=False)),
               lambda: setattr(blk.attention, "wqkv", Linear(32, 64, bias=False).requires_grad_(False)),
               lambda: (setattr(blk.attention_norm, "eps", 0.5), setattr(blk.ffn_norm, "eps", 0.5))]
    before = decode()
    for change in changes:
        change()
        got = decode()
        assert not torch.equal(got, before) and torch.equal(got, fresh())
        before = got


def test_the_arguments_are_checked_once_a_generation():
    """A run of layers checks its kept arguments against the model in full once per KV cache
    (a generation), not on every call; within one cache a module or parameter assigned is
    still seen at the next call."""
    torch.manual_seed(0)
    net = random_llama(4, dtype=torch.float32, n_layers=3, n_heads=4, n_kv_heads=2, dim=32, ffn=48, max_pos=64)
    h = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(1))
    fused._plans.clear()
    with torch.inference_mode(), mock.patch.object(fused.ModelPlan, "current", autospec=True,
                                                   side_effect=fused.ModelPlan.current) as checked:
        for _ in range(2):
            cache = net.new_cache(12)
            net.run_layers(h[:, :4], 0, cache)                 # the prompt (4 rows: fused.layers too)
            for t in range(4, 8):
                net.run_layers(h[:, t:t + 1], t, cache, 0, 1)
                net.run_layers(h[:, t:t + 1], t, cache, 1, 3)
        assert checked.call_count == 1           # the first cache made the plan; the second checked it once
        blk = net.layers[2]
        blk.attention.wo = Linear(32, 32, bias=False).requires_grad_(False)     # mid-generation
        got = net.run_layers(h[:, 8:9], 8, cache, 0, 3)
        cache.truncate(8)
        fused._plans.clear()
        assert torch.equal(got, net.run_layers(h[:, 8:9], 8, cache, 0, 3))


@given(rows=st.integers(1, 5), n=st.one_of(st.integers(1, 70), st.integers(1000, 1100)), seed=st.integers(0, 10**6),
       kind=st.sampled_from(["plain", "ties", "nan", "inf", "-inf only", "zeros of both signs"]))
def test_argmax_is_torchs(rows, n, seed, kind):
    """fused.argmax gives torch.argmax's index in every row: the first maximum (ties, +0 and -0
    equal), the first NaN where there is one, 0 where every value is -inf; any length, not
    only multiples of the vector width."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    pick = torch.rand(rows, n, generator=g) < 0.1
    if kind == "ties":
        x = x.round()
    elif kind == "nan":
        x[pick] = float("nan")
    elif kind == "inf":
        x[pick] = float("inf")
    elif kind == "-inf only":
        x[:] = -float("inf")
    elif kind == "zeros of both signs":
        x = torch.where(pick, -0.0, 0.0) * 1.0
    with torch.inference_mode():
        assert torch.equal(fused.argmax(x), x.argmax(-1))
        assert torch.equal(model.argmax(x[None]), x[None].argmax(-1))          # the call sites' helper


def test_silu_and_its_exp_over_the_whole_float_range():
    """silu(gate) * up in C against float64 from -200 to 200, and at 0, +-inf and NaN (as
    PyTorch's silu: inf, NaN, NaN): within
    3 ulp wherever exp(-gate) is a float (gate > -88.7); below, a result under 1e-36, as
    PyTorch's silu gives (-0 from -89.4 on)."""
    gate = torch.cat([torch.linspace(-200, 200, 200_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.7, -88.7,
                                                                      float("inf"), -float("inf"), float("nan")])])
    gate_up = torch.cat([gate, torch.ones_like(gate)])[None]
    with torch.inference_mode():
        got = fused.silu_mul(gate_up)[0]
    exact = gate.double() * torch.sigmoid(gate.double())
    normal = exact.isfinite() & (gate > -88.7)
    ulp = (exact[normal].float().nextafter(torch.tensor(float("inf"))) - exact[normal].float()).abs().double()
    assert ((got[normal].double() - exact[normal]).abs() <= 3 * ulp).all()      # PyTorch's silu: 2.1 at most
    assert (got[(gate <= -88.7) & gate.isfinite()].abs() < 1e-36).all()
    assert got[-3] == float("inf") and got[-2].isnan() and got[-1].isnan()       # inf, and as PyTorch's: -inf * 0, NaN


def test_nan_and_inf_rows_stay_not_finite():
    """A NaN or inf in a row gives a NaN (or inf) row, as PyTorch's steps do, and leaves the
    other rows alone."""
    norm = RMSNorm(16, 1e-5).requires_grad_(False)
    x = torch.randn(1, 3, 16)
    x[0, 1, 3] = float("nan")
    with torch.inference_mode():
        out = norm(x)
    assert out[0, 1].isnan().all() and out[0, [0, 2]].isfinite().all()
    att = attention_layer(1, 2, 8, 0)
    g = torch.Generator().manual_seed(0)
    qkv = data(g, 1, 3, 32)
    qkv[0, 1, 0] = float("inf")                          # a query of row 1
    cos, sin = rotary_table(g, 3, 8)
    with torch.inference_mode():
        y = att.attend(qkv, 0, KVCache(1, 1, 8, 3), 0, cos, sin)
    assert y[0, 0].isfinite().all() and not y[0, 1].isfinite().all()


def test_where_it_does_not_run():
    """fused.c computes float32 CPU tensors in eager mode only: not float64 or bfloat16, not
    a tensor that records gradients, not a strided view, not inside fused.off()."""
    x = torch.randn(2, 8)
    with torch.inference_mode():
        assert fused.runs(x)
        assert not fused.runs(x.double()) and not fused.runs(x.bfloat16()) and not fused.runs(x.t())
        with fused.off():
            assert not fused.runs(x)
        assert fused.runs(x)
    assert not fused.runs(torch.randn(2, 8, requires_grad=True))


def test_a_model_forward_with_and_without_fused_c():
    """A tiny random Llama in float32: the logits of a prompt and of decoding steps (one row,
    and a several-row call) agree with the PyTorch steps' to float32 rounding."""
    model = random_llama(5, dtype=torch.float32, n_heads=6, n_kv_heads=2, dim=48)
    tokens = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(1))

    def decode():
        cache = model.new_cache(40)
        out = [model.logits(model.run_layers(model.embed(tokens[:, :12]), 0, cache))]
        for p, rows in ((12, 1), (13, 4), (17, 1), (18, 12)):
            out.append(model.logits(model.run_layers(model.embed(tokens[:, p:p + rows]), p, cache)))
        return torch.cat(out, 1)

    got, want = twice(decode)
    assert_close(got, want, atol=1e-4, rtol=1e-4, what="logits with fused.c against PyTorch's steps")


def test_without_a_compiler_the_pytorch_steps_run_and_say_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CC", str(tmp_path / "no-cc"))
    monkeypatch.setattr(fused, "_lib", None)
    x = torch.randn(1, 2, 8)
    with torch.inference_mode():
        assert not fused.runs(x)
        assert not fused.runs(x)                                        # asked again: said once
        assert "a layer's small steps run in PyTorch" in capsys.readouterr().err
        norm = RMSNorm(8, 1e-5)
        assert torch.equal(norm(x), F.rms_norm(x, (8,), norm.weight, 1e-5))
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: real_run(["false"], **kw) if "--version" not in cmd
                        else real_run(cmd, **kw))
    monkeypatch.delenv("CC")
    assert cbuild.build(fused.SOURCE, folder=tmp_path)[0] is None         # a compiler that fails


@given(int8=st.booleans(), residual=st.booleans(), shortlist=st.booleans(), rows=st.integers(1, 9),
       seed=st.integers(0, 10**6))
def test_an_exit_check_in_one_call(int8, residual, shortlist, rows, seed):
    """An exit head's check in C (fused.head_check: T, the residual block, the final norm, the
    projection, each row's top-1, p1, p2, entropy and lse) against heads.py's PyTorch steps,
    float32 and int8, with and without a residual block and a shortlist: the same top-1 where
    the top two logits are not within rounding of each other, and the figures within float32's
    rounding; every row computed alone (a row's bits do not depend on its call)."""
    from heads import ExitHeads
    net = random_llama(seed % 1000, dtype=torch.float32, n_layers=2, n_heads=4, n_kv_heads=2, dim=32, ffn=48, vocab=97)
    net = quantize_int8(net) if int8 else net
    g = torch.Generator().manual_seed(seed)
    heads = ExitHeads(net, [1, 2], torch.eye(32) + 0.2 * data(g, 2, 32, 32),
                      0.2 * data(g, 2, 32, 32) if residual else None).requires_grad_(False)
    heads.set_shortlist(torch.randperm(97, generator=g)[:40].tolist() if shortlist else None)
    h = data(g, rows, 32, scale=3.0)
    with torch.inference_mode():
        assert fused.head_check(heads, 2, h) is not None
        got, want = twice(lambda: heads.features(2, h))
        one = [heads.features(2, h[r]) for r in range(rows)]
        with fused.off():
            norm, output = heads._frozen
            project = output if not shortlist else heads._short_out[0]
            n = norm(heads.transform(2, h))
            z = project(n)
    assert all(torch.equal(got[r], one[r]) for r in range(rows))           # alone or in a call: the same bits
    # How far the logits may move: the norm and silu are float32 summed in another order (a few
    # ulps; 64 of the row's largest logit allowed), and in int8 the projection then rounds its
    # input to 16-bit integers 1/32767 of the largest apart, where a few ulps can move one by
    # one: at most that step times a row's summed |weights|.
    W = project.wq.float() * project.scale[:, None] if int8 else project.weight
    dz = 64 * 2.0 ** -24 * z.abs().amax(-1).clamp(min=1)
    if int8:
        dz = dz + n.abs().amax(-1) / 32767 * W.abs().sum(1).max()
    top2 = z.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * dz
    assert torch.equal(got[clear, 0], want[clear, 0])
    # lse moves by at most dz, p1 and p2 by at most 2 dz, the entropy by dz times the logits' range
    bound = torch.stack([2 * dz, 2 * dz, dz * (2 + z.amax(-1) - z.amin(-1)), 2 * dz], -1)
    assert ((got[:, 1:] - want[:, 1:]).abs() <= bound).all(), "the check's figures in C against PyTorch's"


def test_an_exit_check_on_a_nan_row():
    """A NaN hidden state gives NaN figures (no policy exits on them) and a token index in range,
    and leaves the other rows alone."""
    from heads import ExitHeads
    net = random_llama(3, dtype=torch.float32, n_layers=2, n_heads=4, n_kv_heads=2, dim=32, ffn=48, vocab=97)
    heads = ExitHeads(net, [1], residual=True).requires_grad_(False)
    h = torch.randn(3, 32)
    h[1, 5] = float("nan")
    with torch.inference_mode():
        f = heads.features(1, h)
        guess = heads.check(1, h[1])
    assert f[[0, 2], 1:].isfinite().all() and f[1, 1:].isnan().all() and 0 <= guess.token < 97
    with torch.inference_mode(), pytest.raises(RuntimeError):      # a hidden state of the wrong width: an error
        heads.check(1, torch.randn(31))
