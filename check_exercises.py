"""
Checks for the exercises in EXERCISES.md that add a feature: they fail until the
exercise is done, and pass when it is done right. Not part of the test suite
(`pytest -q` does not collect this file); run one exercise's checks by name:

    .venv/bin/python -m pytest -q check_exercises.py -k entropy      # exercise 6
    .venv/bin/python -m pytest -q check_exercises.py -k sampling     # exercise 7
    .venv/bin/python -m pytest -q check_exercises.py -k batch        # exercise 8

Every check compares against plain decoding on random tiny Llamas in float64, the way
test_parity.py does, so a wrong answer shows up as a concrete counterexample.
"""
import inspect

import pytest
import torch
from hypothesis import given, strategies as st

import adadecode
from adadecode import generate_ada, generate_greedy
from conftest import random_llama
from heads import ExitHeads
from model import InputError
from test_parity import AdversarialHeads, identity_above, random_heads, setups


def needs(fn, *params):
    """Fail with a readable message while the exercise's interface is missing."""
    missing = [p for p in params if p not in inspect.signature(fn).parameters]
    if missing:
        pytest.fail(f"exercise not done yet: {fn.__name__}() has no {', '.join(missing)} parameter")


def needs_function(name):
    if not hasattr(adadecode, name):
        pytest.fail(f"exercise not done yet: adadecode.py has no {name}()")
    return getattr(adadecode, name)


# --- exercise 6: an entropy exit policy, studied in the simulator ----------------------

def needs_policy(name):
    import exits
    if not hasattr(exits, name):
        pytest.fail(f"exercise not done yet: exits.py has no {name} policy")
    return getattr(exits, name)


@given(setup=setups(), seed=st.integers(0, 10**6), noise=st.floats(0.0, 3.0), max_new=st.integers(1, 24),
       bound=st.floats(0.0, 3.0), max_pending=st.integers(0, 5))
def test_entropy_policy_keeps_parity_and_replays_exactly(setup, seed, noise, max_new, bound, max_pending):
    from record import Recorder
    Entropy = needs_policy("Entropy")
    model, layers, prompt = setup
    heads = random_heads(model, layers, seed, noise)
    greedy = generate_greedy(model, prompt, max_new)
    ada = generate_ada(model, heads, prompt, max_new, max_pending=max_pending, policy=Entropy(bound))
    assert ada.tokens == greedy.tokens
    rec = Recorder(model, heads)
    sim, _ = rec.replay([rec.record(prompt, greedy.tokens, max_new, set())], Entropy(bound), max_pending, exact=True)
    assert sim[0].early_by_layer == ada.stats.early_by_layer and sim[0].rejected == ada.stats.rejected


def test_entropy_policy_decides_by_entropy():
    from heads import Guess
    Entropy = needs_policy("Entropy")
    sure, unsure = Guess(3, 0.9, 0.05, 0.4, 5.0), Guess(3, 0.9, 0.05, 1.5, 5.0)   # same p1, other entropy
    p = Entropy(1.0)
    p.reset()
    assert p.active(2) and p.exit(2, sure) and not p.exit(2, unsure)
    q = Entropy({2: 2.0})
    assert q.active(2) and q.exit(2, unsure) and not q.active(5), "a head without a bound must never exit"
    with pytest.raises(InputError):
        Entropy(-0.5)


# --- exercise 7: temperature sampling with a lossless acceptance rule ----------------

@given(setup=setups(), seed=st.integers(0, 10**6), noise=st.floats(0.0, 3.0), threshold=st.floats(0.0, 1.0),
       max_pending=st.integers(0, 6), max_new=st.integers(1, 24), temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_sampling_ada_equals_sampling(setup, seed, noise, threshold, max_pending, max_new, temperature):
    """With the same seed, AdaDecode must emit exactly the tokens plain sampling emits."""
    needs(generate_greedy, "temperature", "seed")
    needs(generate_ada, "temperature", "seed")
    model, layers, prompt = setup
    plain = generate_greedy(model, prompt, max_new, temperature=temperature, seed=seed)
    assert plain.tokens == generate_greedy(model, prompt, max_new, temperature=temperature, seed=seed).tokens, \
        "the same seed must give the same tokens"
    for heads in (random_heads(model, layers, seed, noise), AdversarialHeads(layers, model.args.vocab_size, seed=seed)):
        ada = generate_ada(model, heads, prompt, max_new, threshold=threshold, max_pending=max_pending,
                           temperature=temperature, seed=seed)
        assert ada.tokens == plain.tokens


def test_sampling_temperature_zero_is_greedy():
    needs(generate_greedy, "temperature", "seed")
    model = random_llama(5, n_layers=3, vocab=11)
    for seed in range(5):
        assert generate_greedy(model, [1, 2], 12, temperature=0.0, seed=seed).tokens == \
            generate_greedy(model, [1, 2], 12).tokens


@torch.no_grad()
def exact_two_token_distribution(model, prompt, temperature):
    """P(first two generated tokens = (a, b)) under sampling at `temperature`, computed exactly."""
    V = model.args.vocab_size
    P = torch.zeros(V, V, dtype=torch.float64)
    for a in range(V):
        x = torch.tensor([prompt + [a]])
        z = model.logits(model.run_layers(model.embed(x), 0, model.new_cache(len(prompt) + 1)))[0]
        pa = torch.softmax(z[-2] / temperature, -1)[a]
        P[a] = pa * torch.softmax(z[-1] / temperature, -1)
    return P


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_sampling_draws_from_the_softmax(temperature):
    """Over many seeds, the first two tokens follow softmax(logits / temperature), for plain
    sampling and for AdaDecode (total variation distance within sampling noise)."""
    needs(generate_greedy, "temperature", "seed")
    needs(generate_ada, "temperature", "seed")
    model = random_llama(1, n_layers=3, vocab=5)
    prompt, n = [1, 3, 2], 3000
    P = exact_two_token_distribution(model, prompt, temperature)
    Q = exact_two_token_distribution(model, prompt, 2 * temperature)
    tol = 0.06                                        # expected distance from noise alone is about 0.02-0.03
    assert (P - Q).abs().sum() / 2 > 2 * tol, "this check could not tell the temperature apart (pick another model)"
    heads = AdversarialHeads([1, 2], model.args.vocab_size, seed=0)
    for name, gen in [("sampling", lambda s: generate_greedy(model, prompt, 2, temperature=temperature, seed=s)),
                      ("AdaDecode", lambda s: generate_ada(model, heads, prompt, 2, threshold=0.5,
                                                           temperature=temperature, seed=s))]:
        counts = torch.zeros_like(P)
        for s in range(n):
            a, b = gen(s).tokens
            counts[a, b] += 1
        tv = (counts / n - P).abs().sum().item() / 2
        assert tv < tol, f"{name}: the first two tokens are {tv:.3f} (total variation) from softmax(logits / T)"


# --- exercise 8: batch size 2 ---------------------------------------------------------

def two_prompts(model, seed, length):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(model.args.vocab_size, (length,), generator=g).tolist() for _ in range(2)]


@given(setup=setups(), seed=st.integers(0, 10**6), max_new=st.integers(1, 24), use_eos=st.booleans())
def test_batch_greedy_equals_one_at_a_time(setup, seed, max_new, use_eos):
    generate_greedy_batch = needs_function("generate_greedy_batch")
    model, layers, prompt = setup
    prompts = two_prompts(model, seed, len(prompt))
    eos = {seed % model.args.vocab_size} if use_eos else set()
    singles = [generate_greedy(model, p, max_new, eos) for p in prompts]
    batch = generate_greedy_batch(model, prompts, max_new, eos)
    assert batch.tokens == [r.tokens for r in singles]
    assert batch.stats.layer_calls == max(r.stats.layer_calls for r in singles), \
        "both sequences must share every layer call"


@given(setup=setups(), seed=st.integers(0, 10**6), noise=st.floats(0.0, 3.0), threshold=st.floats(0.0, 1.0),
       max_pending=st.integers(0, 6), max_new=st.integers(1, 24), use_eos=st.booleans())
def test_batch_ada_equals_one_at_a_time(setup, seed, noise, threshold, max_pending, max_new, use_eos):
    generate_ada_batch = needs_function("generate_ada_batch")
    model, layers, prompt = setup
    prompts = two_prompts(model, seed, len(prompt))
    eos = {seed % model.args.vocab_size} if use_eos else set()
    want = [generate_greedy(model, p, max_new, eos).tokens for p in prompts]
    for heads in (random_heads(model, layers, seed, noise), AdversarialHeads(layers, model.args.vocab_size, seed=seed)):
        batch = generate_ada_batch(model, heads, prompts, max_new, eos, threshold=threshold, max_pending=max_pending)
        assert batch.tokens == want


def test_batch_ada_shares_layer_calls():
    generate_ada_batch = needs_function("generate_ada_batch")
    model = identity_above(random_llama(7, n_layers=5), 2)     # a head after layer 2 is always right
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]]
    heads = ExitHeads(model, [2])
    singles = [generate_ada(model, heads, p, 30, threshold=0.0, max_pending=4) for p in prompts]
    batch = generate_ada_batch(model, heads, prompts, 30, threshold=0.0, max_pending=4)
    assert batch.tokens == [r.tokens for r in singles]
    assert sum(batch.stats.early_by_layer.values()) > 20, "the batch should exit early when every row is confident"
    assert batch.stats.layer_calls < sum(r.stats.layer_calls for r in singles), \
        "the two sequences must share layer calls, not run one after the other"
