"""AdaDecode and self-speculative decoding must produce greedy decoding's tokens, exactly.

Properties over random tiny Llamas in float64 (random shapes, rope settings, prompts,
head placements, head weights, thresholds, max_pending), adversarial heads that force
rollbacks at every depth, heads that are always right, EOS inside a pending block; then
the real default model with its shipped heads in float32.

    pytest -q test_parity.py
"""
import os
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, strategies as st

import fused
import int8mm
from adadecode import DEFAULT_HEADS, default_max_pending, exit_policy, generate_ada, generate_greedy, generate_selfspec
from checkpoint import load_model
from conftest import assert_close, random_llama
from exits import Threshold
from heads import ExitHeads, Guess
from model import InputError, ROW_BY_ROW
from quantize import (Int4Linear, Int8Linear, block_linears, int4_grid, int4_is_lossless, precision, quantize_int4,
                      quantize_int8, rounding_error)

DEVICE = torch.device(os.environ.get("ADADECODE_TEST_DEVICE") or "cpu")   # where the float properties run (conftest checks it)


class AdversarialHeads:
    """Always fully confident, usually wrong: a pseudo-random token from the hidden state."""

    def __init__(self, layers, vocab, eos=None, p_eos=0.0, seed=0):
        self.layers, self.vocab, self.eos, self.p_eos = layers, vocab, eos, p_eos
        self.rng = random.Random(seed)

    def check(self, layer, h):
        tok = self.eos if self.eos is not None and self.rng.random() < self.p_eos else self.rng.randrange(self.vocab)
        return Guess(tok, 1.0, 0.0, 0.0, 0.0)


def random_heads(model, layers, seed, noise, residual=None):
    """Heads near the logit lens, with residual blocks (heads.py) too if `residual`, or for
    every other seed when it is None."""
    g = torch.Generator().manual_seed(seed)
    d = model.args.dim
    T = torch.eye(d, dtype=torch.float64).repeat(len(layers), 1, 1)
    T = T + noise * torch.randn(T.shape, generator=g, dtype=torch.float64) / d ** 0.5
    residual = seed % 2 == 1 if residual is None else residual
    W = noise * torch.randn(T.shape, generator=g, dtype=torch.float64) / d ** 0.5 if residual else None
    return ExitHeads(model, layers, T, W)


def check_same_cache(a, b):
    assert a.lengths == b.lengths, f"cache lengths {a.lengths} != greedy's {b.lengths}"
    for l, n in enumerate(a.lengths):
        assert_close(a.k[l, :, :, :n], b.k[l, :, :, :n], atol=1e-9, rtol=1e-9, what=f"layer {l} keys")
        assert_close(a.v[l, :, :, :n], b.v[l, :, :, :n], atol=1e-9, rtol=1e-9, what=f"layer {l} values")


@st.composite
def setups(draw):
    n_layers = draw(st.integers(2, 6))
    n_kv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8]))
    rope = draw(st.sampled_from([None, {"type": "linear", "factor": 2.0},
                                 {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8}]))
    model = random_llama(draw(st.integers(0, 10**6)), n_layers=n_layers, n_heads=n_kv * group, n_kv_heads=n_kv,
                         dim=n_kv * group * head_dim, vocab=draw(st.sampled_from([5, 11, 61])),
                         rope_scaling=rope, rope_theta=draw(st.sampled_from([100.0, 10000.0])), max_pos=64,
                         arch=draw(st.sampled_from(["llama", "qwen2"])), device=DEVICE)
    layers = sorted(draw(st.sets(st.integers(1, n_layers), min_size=1, max_size=n_layers)))
    prompt = draw(st.lists(st.integers(0, model.args.vocab_size - 1), min_size=1, max_size=10))
    return model, layers, prompt


@given(setup=setups(), seed=st.integers(0, 10**6), noise=st.floats(0.0, 3.0),
       threshold=st.floats(0.0, 1.0), max_pending=st.integers(0, 6), max_new=st.integers(1, 24),
       use_eos=st.booleans())
def test_ada_equals_greedy_random_heads(setup, seed, noise, threshold, max_pending, max_new, use_eos):
    model, layers, prompt = setup
    eos = {seed % model.args.vocab_size} if use_eos else set()
    greedy = generate_greedy(model, prompt, max_new, eos)
    heads = random_heads(model, layers, seed, noise)
    ada = generate_ada(model, heads, prompt, max_new, eos, threshold=threshold, max_pending=max_pending)
    assert ada.tokens == greedy.tokens
    check_same_cache(ada.cache, greedy.cache)
    s = ada.stats
    assert s.accepted + s.rejected + s.discarded == sum(s.early_by_layer.values())
    if layers[0] < model.args.n_layers:                      # a head at the last layer never drafts
        spec = generate_selfspec(model, heads, prompt, max_new, eos, draft_layer=layers[0], k=1 + seed % 5)
        assert spec.tokens == greedy.tokens
        check_same_cache(spec.cache, greedy.cache)


@given(setup=setups(), seed=st.integers(0, 10**6), max_pending=st.integers(1, 6), max_new=st.integers(1, 24),
       p_eos=st.sampled_from([0.0, 0.3]))
def test_ada_equals_greedy_adversarial_heads(setup, seed, max_pending, max_new, p_eos):
    """Always confident, usually wrong: rollbacks at every depth, early EOS inside pending blocks."""
    model, layers, prompt = setup
    eos = {seed % model.args.vocab_size}
    greedy = generate_greedy(model, prompt, max_new, eos)
    heads = AdversarialHeads(layers, model.args.vocab_size, eos=min(eos), p_eos=p_eos, seed=seed)
    ada = generate_ada(model, heads, prompt, max_new, eos, threshold=0.9, max_pending=max_pending)
    assert ada.tokens == greedy.tokens
    check_same_cache(ada.cache, greedy.cache)
    draft = [l for l in layers if l < model.args.n_layers]     # a head at the last layer never drafts
    if draft:
        spec = generate_selfspec(model, heads, prompt, max_new, eos, draft_layer=draft[-1], k=max_pending)
        assert spec.tokens == greedy.tokens


def identity_above(model, layer):
    """Zero the attention and MLP outputs of every layer above `layer`: the residual stream
    passes through unchanged, so a logit-lens head after `layer` is the final head exactly
    (the deferred layers still run and still fill their KV caches)."""
    for blk in model.layers[layer:]:
        blk.attention.wo.weight.zero_()
        blk.feed_forward.w2.weight.zero_()
    return model


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_always_right_heads_are_never_rejected(layer):
    model = identity_above(random_llama(7, n_layers=5, device=DEVICE), layer)
    prompt = [3, 1, 4, 1, 5]
    greedy = generate_greedy(model, prompt, 30)
    ada = generate_ada(model, ExitHeads(model, [layer]), prompt, 30, threshold=0.0, max_pending=4)
    assert ada.tokens == greedy.tokens
    assert ada.stats.rejected == 0 and ada.stats.accepted == sum(ada.stats.early_by_layer.values()) > 20
    assert ada.stats.rows_hist[5] > 0          # five rows (4 deferred + 1 new) shared layer calls
    check_same_cache(ada.cache, greedy.cache)


def test_edge_cases():
    model = random_llama(11, n_layers=4, max_pos=32, device=DEVICE)
    heads = AdversarialHeads([1, 2, 3], model.args.vocab_size, seed=1)
    for prompt, n in [([5], 10), ([5, 6, 7], 1), (list(range(25)), 20)]:   # one-token prompt; 1 token; context ends
        greedy = generate_greedy(model, prompt, n)
        ada = generate_ada(model, heads, prompt, n, threshold=0.5, max_pending=5)
        assert ada.tokens == greedy.tokens
    assert len(greedy.tokens) == 32 - 25                                      # stopped at the context limit
    # the rejected token is the very first pending row, several times in a row
    ada = generate_ada(model, heads, [1, 2], 12, threshold=0.0, max_pending=5)
    assert ada.tokens == generate_greedy(model, [1, 2], 12).tokens and ada.stats.rollbacks >= 5
    # threshold 0: every head check exits; max_pending 0 or an unreachable threshold: none does
    real = ExitHeads(model, [1, 4])                                           # a head at the first and the last layer
    assert generate_ada(model, real, [1, 2], 12, threshold=0.0).stats.head_checks == \
        sum(generate_ada(model, real, [1, 2], 12, threshold=0.0).stats.early_by_layer.values())
    for kw in [dict(threshold=0.0, max_pending=0), dict(threshold=1.0)]:
        a = generate_ada(model, real, [1, 2], 12, **kw)
        assert a.tokens == generate_greedy(model, [1, 2], 12).tokens and sum(a.stats.early_by_layer.values()) == 0


def test_bad_heads_and_thresholds_are_rejected():
    model = random_llama(0, n_layers=4)
    for layers in ([2, 2], [3, 1], [0], [5], []):
        with pytest.raises(InputError, match="layer"):
            ExitHeads(model, layers)
    for t in (-0.1, 1.01):
        with pytest.raises(InputError, match=r"\[0, 1\]"):
            generate_ada(model, ExitHeads(model, [2]), [1], 4, threshold=t)


# --- the real default model, float32 ------------------------------------------------

REAL_PROMPTS = [
    "Write a Python function `is_prime(n)` that returns True when n is prime.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "What is 15% of 240? Show your working.",
    "A train travels 120 km in 1.5 hours. What is its average speed?",
    "Summarise in two sentences: Bees pollinate many crops. Their numbers have fallen because of pesticides, "
    "disease and the loss of wild flowers, and farmers now rent hives to pollinate orchards.",
    "Tell me a fun fact about octopuses.",
]


def test_real_model_parity_with_shipped_heads(real):
    folder, model, tok, eos = real
    if DEVICE.type != "cpu":
        model = load_model(folder, dtype=torch.float32, device=DEVICE)
    heads = ExitHeads.load(DEFAULT_HEADS, model)
    early = rollbacks = 0
    for text in REAL_PROMPTS:
        ids = tok.prompt_ids(text)
        greedy = generate_greedy(model, ids, 64, eos)
        for policy in (exit_policy(heads), Threshold(0.75), Threshold(0.3)):   # tuned, the paper's, forced rollbacks
            ada = generate_ada(model, heads, ids, 64, eos, policy=policy)
            assert ada.tokens == greedy.tokens, (text, policy.spec())
            early += sum(ada.stats.early_by_layer.values())
            rollbacks += ada.stats.rollbacks
    assert early > 50 and rollbacks >= 1
    spec = generate_selfspec(model, heads, tok.prompt_ids(REAL_PROMPTS[0]), 64, eos)
    assert spec.tokens == generate_greedy(model, tok.prompt_ids(REAL_PROMPTS[0]), 64, eos).tokens
    assert spec.stats.accepted > 0


# --- int8, int4, and float32 with fused.c: bit for bit, not only token for token -------
# These forwards are batch-invariant: a row's result does not depend on how many rows share
# its layer call. So AdaDecode's rows, deferred and batched, are bitwise greedy's.

def quantized_llama(seed, n_layers, shape, ffn, vocab, max_pos=256, arch="llama", bits=8):
    """A random Llama (or Qwen2) in int8 (bits 8), int4 (4), or float32 left as it is (32)."""
    n_kv, group, head_dim = shape
    model = random_llama(seed, dtype=torch.float32, n_layers=n_layers, n_heads=n_kv * group, n_kv_heads=n_kv,
                         dim=n_kv * group * head_dim, ffn=ffn, vocab=vocab, max_pos=max_pos, arch=arch)
    return {8: quantize_int8, 4: quantize_int4, 32: lambda m: m}[bits](model)


def scored_rows(model):
    """Wrap model.logits: record {position: (hidden row, logits row)} for every row it
    scores; a position scored again (after a rollback) keeps its last, verified, value."""
    caches, rows = [], {}
    new_cache, logits = model.new_cache, model.logits

    def recording_cache(n):
        caches.append(new_cache(n))
        return caches[-1]

    def recording_logits(h):
        z = logits(h)
        hs, zs = h.reshape(-1, h.shape[-1]), z.reshape(-1, z.shape[-1])
        top = caches[-1].lengths[-1]                     # the rows are the last ones the top layer holds
        for r in range(hs.shape[0]):
            rows[top - hs.shape[0] + r] = (hs[r].clone(), zs[r].clone())
        return z

    model.new_cache, model.logits = recording_cache, recording_logits
    return rows


@st.composite
def quantized_setups(draw, bits=(8, 4)):
    n_layers = draw(st.integers(2, 5))
    shape = draw(st.sampled_from([(1, 1, 64), (1, 2, 32), (2, 2, 16), (1, 4, 16), (2, 1, 32), (4, 1, 16)]))
    model = quantized_llama(draw(st.integers(0, 10**6)), n_layers, shape, draw(st.sampled_from([64, 128, 192])),
                            draw(st.sampled_from([5, 11, 61])), max_pos=1024, arch=draw(st.sampled_from(["llama", "qwen2"])),
                            bits=draw(st.sampled_from(bits)))
    layers = sorted(draw(st.sets(st.integers(1, n_layers), min_size=1, max_size=n_layers)))
    n = draw(st.one_of(st.integers(1, 24), st.integers(250, 700)))   # long ones: attention splits its keys
    rnd = random.Random(draw(st.integers(0, 10**6)))
    prompt = [rnd.randrange(model.args.vocab_size) for _ in range(n)]
    return model, layers, prompt


def assert_bitwise_equal_runs(model, run_greedy, run_ada):
    g_rows = scored_rows(model)
    greedy = run_greedy()
    a_rows = scored_rows(model)
    ada = run_ada()
    del model.new_cache, model.logits                   # back to the class's methods
    assert ada.tokens == greedy.tokens
    assert ada.cache.lengths == greedy.cache.lengths
    for l, n in enumerate(greedy.cache.lengths):
        assert torch.equal(ada.cache.k[l, :, :, :n], greedy.cache.k[l, :, :, :n]), f"layer {l} keys differ"
        assert torch.equal(ada.cache.v[l, :, :, :n], greedy.cache.v[l, :, :, :n]), f"layer {l} values differ"
    for pos, (h, z) in g_rows.items():                 # every row that produced a token
        assert torch.equal(a_rows[pos][0], h) and torch.equal(a_rows[pos][1], z), f"position {pos} differs"
    return ada


@given(setup=quantized_setups(), seed=st.integers(0, 10**6), noise=st.floats(0.0, 3.0), threshold=st.floats(0.0, 1.0),
       max_pending=st.integers(0, 8), max_new=st.integers(1, 32), adversarial=st.booleans())
def test_quantized_ada_is_bitwise_greedy(setup, seed, noise, threshold, max_pending, max_new, adversarial):
    """int8 or int4: tokens, every layer's KV cache, and every verified row's final hidden
    state and logits: torch.equal, with random or adversarial heads and any max_pending."""
    model, layers, prompt = setup
    heads = (AdversarialHeads(layers, model.args.vocab_size, seed=seed) if adversarial
             else random_heads(model, layers, seed, noise))
    assert_bitwise_equal_runs(model, lambda: generate_greedy(model, prompt, max_new),
                              lambda: generate_ada(model, heads, prompt, max_new, threshold=threshold,
                                                   max_pending=max_pending))


@given(setup=quantized_setups(bits=[32]), seed=st.integers(0, 10**6), noise=st.floats(0.0, 3.0),
       threshold=st.floats(0.0, 1.0), max_pending=st.integers(0, ROW_BY_ROW - 1), max_new=st.integers(1, 32),
       adversarial=st.booleans())
def test_float32_ada_is_bitwise_greedy_on_the_cpu(setup, seed, noise, threshold, max_pending, max_new, adversarial):
    """float32 on the CPU, where fused.c runs every decoding call of at most ROW_BY_ROW rows
    (max_pending below it): bit for bit as int8 and int4 are, not only token for token."""
    model, layers, prompt = setup
    assert fused.runs(model.norm.weight)
    heads = (AdversarialHeads(layers, model.args.vocab_size, seed=seed) if adversarial
             else random_heads(model, layers, seed, noise))
    assert_bitwise_equal_runs(model, lambda: generate_greedy(model, prompt, max_new),
                              lambda: generate_ada(model, heads, prompt, max_new, threshold=threshold,
                                                   max_pending=max_pending))


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_default_max_pending_keeps_every_call_within_the_kernels_pass(bits):
    """Without a max_pending, int4 holds at most 3 early tokens and int8 at most 7 (every
    layer call within one pass of their kernels' 4 and 8 rows; 3 where int8's kernel is
    AVX2's or plain C's, which have no pass), float32 at most 5; the output stays greedy's."""
    model = (random_llama(3, dtype=torch.float32, n_layers=4, n_heads=2, n_kv_heads=1, dim=64, ffn=128, vocab=61)
             if bits is None else quantized_llama(3, 4, (1, 2, 32), 128, 61, bits=bits))
    prompt = list(range(1, 9))
    ada = generate_ada(model, ExitHeads(model, [1, 2]), prompt, 40, threshold=0.0)    # every check exits
    assert ada.tokens == generate_greedy(model, prompt, 40).tokens
    int8_rows = 8 if int8mm.kernel()[1] in ("amx", "avx512-vnni") else 4
    assert max(ada.stats.rows_hist) == {None: 6, 8: int8_rows, 4: 4}[bits]


def test_int8s_default_max_pending_follows_its_kernel(monkeypatch):
    """int8 waits for up to 7 early tokens where its kernel multiplies 8 rows in one pass (AMX,
    AVX-512 VNNI), and for 3 where each row costs its own multiplies (AVX2, plain C, the
    PyTorch reference)."""
    model = quantized_llama(3, 2, (1, 2, 32), 128, 61, bits=8)
    for isa, n in (("amx", 7), ("avx512-vnni", 7), ("avx2", 3), ("c", 3), ("reference: no C compiler", 3)):
        monkeypatch.setattr(int8mm, "kernel", lambda isa=isa: (None, isa))
        assert default_max_pending(model) == n, isa


@given(seed=st.integers(0, 10**6), pos=st.integers(0, 700), rows=st.integers(2, 24), bits=st.sampled_from([8, 4]))
def test_quantized_layer_calls_are_batch_invariant(seed, pos, rows, bits):
    """One call on `rows` rows equals `rows` one-row calls, bit for bit, at every layer,
    at cache lengths long enough for attention kernels to split their keys into blocks
    (one masked multi-row call differs from one-row calls at some of them). Every call
    after the prompt counts, whatever its rows; a prompt (pos 0) of more than ROW_BY_ROW
    rows takes the masked kernel."""
    assume(pos > 0 or rows <= ROW_BY_ROW)
    model = quantized_llama(seed, 3, (1, 2, 32), 128, 61, max_pos=1024, bits=bits)
    h = torch.randn(1, pos + rows, 64, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        a, b = model.new_cache(pos + rows), model.new_cache(pos + rows)
        model.run_layers(h[:, :pos], 0, a) if pos else None
        model.run_layers(h[:, :pos], 0, b) if pos else None
        together = model.run_layers(h[:, pos:], pos, a)
        alone = torch.cat([model.run_layers(h[:, pos + t:pos + t + 1], pos + t, b) for t in range(rows)], dim=1)
    assert torch.equal(together, alone)
    assert torch.equal(model.logits(together), model.logits(alone))


def test_int8_is_close_to_float32_and_refuses_what_it_cannot_run(monkeypatch):
    model = random_llama(3, dtype=torch.float32, dim=64, ffn=128, n_heads=4, n_kv_heads=2)
    x = torch.randn(5, 64)
    ref = model.layers[0].feed_forward.w13(x)
    q = Int8Linear(model.layers[0].feed_forward.w13.weight)(x)
    assert (q - ref).norm() / ref.norm() < 0.02      # the int8 weights' rounding: about 1% error
    assert precision(quantize_int8(random_llama(3, dtype=torch.float32, dim=40, ffn=72))) == "int8"   # any width
    import quantize
    monkeypatch.setattr(quantize, "MAX_K", 32)      # past it an int32 sum could overflow
    with pytest.raises(InputError, match="at most 32 inputs"):
        quantize_int8(random_llama(3, dtype=torch.float32, dim=64))
    fake = SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(InputError, match="CPU only"):
        quantize_int8(fake)


def test_int4_recovers_a_4_bit_grid_and_refuses_what_it_cannot_run():
    """Weights already on a 4-bit grid of 32-input groups (as a Q4_1 or Q4_K GGUF file stores
    them) come back up to bfloat16's rounding of scale and zero, closer than int8 gets; the
    kernel's own product agrees; ordinary weights lose about 8%, and int4_is_lossless tells
    the two apart. Shapes the kernel cannot take are refused with a one-line reason."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g)
    q, scale, zero = int4_grid(w)
    assert q.min() >= 0 and q.max() <= 15
    lo = torch.randn(96, 4, 1, generator=g)
    step = torch.rand(96, 4, 1, generator=g) + 0.1
    grid = (lo + step * torch.randint(0, 16, (96, 4, 32), generator=g)).view(96, 128)
    grid.view(96, 4, 32)[:, :, 0], grid.view(96, 4, 32)[:, :, 1] = lo[..., 0], (lo + 15 * step)[..., 0]  # both ends used
    assert rounding_error(grid, 4) < 0.01 < rounding_error(w, 4) < 0.12
    assert rounding_error(grid, 4) < rounding_error(grid, 8) and rounding_error(w, 8) < rounding_error(w, 4)
    x = torch.randn(5, 128, generator=g)
    for weight, tol in ((grid, 0.01), (w, 0.12)):                # bfloat16 activations add about 0.3%
        ref, got = x @ weight.T, Int4Linear(weight)(x)
        assert (got - ref).norm() / ref.norm() < tol
    model = random_llama(3, dtype=torch.float32, dim=64, ffn=128, n_heads=4, n_kv_heads=2)
    assert not int4_is_lossless(model)
    with torch.no_grad():
        for m in block_linears(model):
            m.weight.copy_(grid[:m.out_features].repeat(m.out_features // 96 + 1, m.in_features // 128 + 1)
                           [:m.out_features, :m.in_features])
    assert int4_is_lossless(model)
    assert precision(quantize_int4(model)) == "int4" and isinstance(model.output, Int8Linear)
    with pytest.raises(InputError, match="multiple of 16 outputs"):
        quantize_int4(random_llama(3, dtype=torch.float32, dim=64, ffn=100, n_heads=4, n_kv_heads=2))
    with pytest.raises(InputError, match="CPU only"):
        quantize_int4(SimpleNamespace(device=torch.device("cuda")))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int4])
def test_real_model_quantized_is_bitwise_greedy(real, dtype):
    folder = real[0]
    tok, eos = real[2], real[3]
    model = load_model(folder, dtype=dtype)
    heads = ExitHeads.load(DEFAULT_HEADS, model)                  # float32-trained heads fit the quantised model
    context_exits = 0
    for text in REAL_PROMPTS[:3]:
        ids = tok.prompt_ids(text)
        ada = assert_bitwise_equal_runs(model, lambda: generate_greedy(model, ids, 48, eos),
                                        lambda: generate_ada(model, heads, ids, 48, eos, policy=Threshold(0.3)))
        assert ada.stats.rollbacks >= 1 or ada.stats.accepted > 5
        shipped = assert_bitwise_equal_runs(model, lambda: generate_greedy(model, ids, 48, eos),   # the context's exit too
                                            lambda: generate_ada(model, heads, ids, 48, eos, policy=exit_policy(heads)))
        context_exits += shipped.stats.early_by_layer[0]
    assert context_exits > 0
    # more pending rows than ROW_BY_ROW: a decoding call of 17+ rows still attends row by row
    # (the prompt's masked kernel gave other bits here, and other tokens)
    ids = tok.prompt_ids("Repeat the word 'apple' forty times, separated by commas.")
    wide = assert_bitwise_equal_runs(model, lambda: generate_greedy(model, ids, 64, eos),
                                     lambda: generate_ada(model, heads, ids, 64, eos, max_pending=20,
                                                          policy=Threshold(0.0)))
    assert max(wide.stats.rows_hist) > ROW_BY_ROW
