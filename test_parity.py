"""AdaDecode and self-speculative decoding must produce greedy decoding's tokens, exactly.

Properties over random tiny Llamas in float64 (random shapes, rope settings, prompts,
head placements, head weights, thresholds, max_pending), adversarial heads that force
rollbacks at every depth, heads that are always right, EOS inside a pending block; then
the real default model with its shipped heads in float32.

    pytest -q test_parity.py
"""
import random

import pytest
import torch
from hypothesis import given, strategies as st

from adadecode import DEFAULT_HEADS, exit_policy, generate_ada, generate_greedy, generate_selfspec
from conftest import assert_close, random_llama
from exits import Threshold
from heads import ExitHeads, Guess
from model import InputError


class AdversarialHeads:
    """Always fully confident, usually wrong: a pseudo-random token from the hidden state."""

    def __init__(self, layers, vocab, eos=None, p_eos=0.0, seed=0):
        self.layers, self.vocab, self.eos, self.p_eos = layers, vocab, eos, p_eos
        self.rng = random.Random(seed)

    def check(self, layer, h):
        tok = self.eos if self.eos is not None and self.rng.random() < self.p_eos else self.rng.randrange(self.vocab)
        return Guess(tok, 1.0, 0.0, 0.0, 0.0)


def random_heads(model, layers, seed, noise):
    g = torch.Generator().manual_seed(seed)
    d = model.args.dim
    T = torch.eye(d, dtype=torch.float64).repeat(len(layers), 1, 1)
    T = T + noise * torch.randn(T.shape, generator=g, dtype=torch.float64) / d ** 0.5
    return ExitHeads(model, layers, T)


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
                         rope_scaling=rope, rope_theta=draw(st.sampled_from([100.0, 10000.0])), max_pos=64)
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
    spec = generate_selfspec(model, heads, prompt, max_new, eos, draft_layer=layers[-1], k=max_pending)
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
    model = identity_above(random_llama(7, n_layers=5), layer)
    prompt = [3, 1, 4, 1, 5]
    greedy = generate_greedy(model, prompt, 30)
    ada = generate_ada(model, ExitHeads(model, [layer]), prompt, 30, threshold=0.0, max_pending=4)
    assert ada.tokens == greedy.tokens
    assert ada.stats.rejected == 0 and ada.stats.accepted == sum(ada.stats.early_by_layer.values()) > 20
    assert ada.stats.rows_hist[5] > 0          # five rows (4 deferred + 1 new) shared layer calls
    check_same_cache(ada.cache, greedy.cache)


def test_edge_cases():
    model = random_llama(11, n_layers=4, max_pos=32)
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
