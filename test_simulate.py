"""The exit-policy simulator replays exactly what the real loop does, and every exit
policy (threshold, margin, logistic, guard) keeps AdaDecode token-exact.

    pytest -q test_simulate.py
"""
import json
from dataclasses import asdict

import pytest
from hypothesis import given, strategies as st

from adadecode import generate_ada, generate_greedy
from exits import FEATURES, Guard, Logistic, Threshold, from_spec, in_context, lookup
from heads import Guess
from model import InputError
from record import Recorder
from simulate import Trace, choose_thresholds, figures, fit_logistic, scaled_cost
from test_parity import check_same_cache, random_heads, setups


def stats_dict(stats):
    d = asdict(stats)
    d.pop("trace")
    return d


@st.composite
def policies(draw, layers, n_layers):
    kind = draw(st.sampled_from(["p1", "margin", "logistic"]))
    per_layer = draw(st.booleans())
    t = st.floats(0.01, 0.99)
    threshold = {l: draw(t) for l in layers if draw(st.booleans())} if per_layer else draw(t)
    if kind == "logistic":
        w = st.floats(-4.0, 4.0)
        n = draw(st.sampled_from([5, 1 + len(FEATURES)]))           # without or with the context features
        exits = ([0] if n > 5 and draw(st.booleans()) else []) + list(layers)   # 0: the context's own exit
        policy = Logistic({l: [draw(w) for _ in range(n)] for l in exits}, threshold)
    else:
        policy = Threshold(threshold, kind)
    if draw(st.booleans()):
        policy = Guard(policy, n_layers, slack=draw(st.floats(-0.5, 0.5)), alpha=draw(st.floats(0.05, 0.9)),
                       prior=draw(st.floats(0.0, 1.0)), probe=draw(st.integers(1, 5)))
    return policy


@given(setup=setups(), seed=st.integers(0, 10**6), noise=st.floats(0.0, 3.0), max_pending=st.integers(0, 6),
       max_new=st.integers(1, 24), use_eos=st.booleans(), data=st.data())
def test_replay_equals_the_real_loop(setup, seed, noise, max_pending, max_new, use_eos, data):
    """Same exits, rollbacks, layer calls, rows, checks and ideal speedup as generate_ada, for
    any policy, with wrong branches computed exactly; the policy keeps the output exact."""
    model, layers, prompt = setup
    eos = {seed % model.args.vocab_size} if use_eos else set()
    heads = random_heads(model, layers, seed, noise)
    policy = data.draw(policies([l for l in layers if l < model.args.n_layers], model.args.n_layers))
    greedy = generate_greedy(model, prompt, max_new, eos)
    real = generate_ada(model, heads, prompt, max_new, eos, max_pending=max_pending, policy=policy)
    assert real.tokens == greedy.tokens
    check_same_cache(real.cache, greedy.cache)
    s = real.stats
    assert s.accepted + s.rejected + s.discarded == sum(s.early_by_layer.values())
    assert sum(s.verify_rows.values()) == s.verifications and max(s.verify_rows, default=1) <= max_pending + 1

    rec = Recorder(model, heads)
    trace = rec.record(prompt, greedy.tokens, max_new, eos)
    assert trace.tokens == greedy.tokens                       # the teacher-forced pass agrees with greedy
    sim, _ = rec.replay([trace], policy, max_pending, exact=True)
    assert stats_dict(sim[0]) == stats_dict(real.stats)
    n = [len(greedy.tokens)]
    assert figures(sim, n)["ideal_speedup"] == real.stats.summary(len(greedy.tokens))["ideal_speedup"]
    again, misses = rec.replay([trace], policy, max_pending)   # the branches are now in the trace
    assert misses == 0 and stats_dict(again[0]) == stats_dict(real.stats)
    stored = Trace.from_json(json.loads(json.dumps(trace.to_json())))   # as a cached trace comes back, no branches
    fresh, _ = rec.replay([stored], policy, max_pending, exact=True)
    assert stats_dict(fresh[0]) == stats_dict(real.stats)


def test_approximate_branches_are_counted():
    """Without the model, a guess on a wrong branch is approximated by greedy's guess at
    that position, and counted; greedy-path replays need no approximation."""
    from conftest import random_llama
    model = random_llama(5, n_layers=4, vocab=11)
    heads = random_heads(model, [1, 2], seed=3, noise=2.0, residual=False)   # heads that are often wrong here
    prompt = [1, 2, 3]
    greedy = generate_greedy(model, prompt, 40)
    rec = Recorder(model, heads)
    trace = rec.record(prompt, greedy.tokens, 40, set())
    _, misses = rec.replay([trace], Threshold(0.0), 4)          # always exits: many wrong branches
    assert misses > 0
    stats, misses = rec.replay([trace], "oracle", 4)             # only right guesses: never off greedy's path
    assert misses == 0 and sum(s.rejected for s in stats) == 0 and sum(s.accepted for s in stats) > 0


def test_guard_switches_a_bad_head_off_and_keeps_parity():
    """Heads that are always confident and always wrong: the guard stops checking them
    after a few rejections (re-probing now and then); the output stays greedy's."""
    from conftest import random_llama

    class Wrong:
        layers = [1, 2]

        def check(self, layer, h):
            return Guess(0, 1.0, 0.0, 0.0, 0.0)                # token 0, which greedy never emits below
    model = random_llama(8, n_layers=4, vocab=11)
    greedy = generate_greedy(model, [3, 4], 60)
    assert 0 not in greedy.tokens[1:]
    plain = generate_ada(model, Wrong(), [3, 4], 60, policy=Threshold(0.5))
    guarded = generate_ada(model, Wrong(), [3, 4], 60, policy=Guard(Threshold(0.5), 4, probe=10))
    assert plain.tokens == guarded.tokens == greedy.tokens
    assert guarded.stats.rejected < plain.stats.rejected / 3
    assert guarded.stats.sequential_layers < plain.stats.sequential_layers
    # starting below every head's bar, the heads only rehearse: not one exit, so not one rollback
    cautious = generate_ada(model, Wrong(), [3, 4], 60, policy=Guard(Threshold(0.5), 4, prior=0.0, probe=1))
    assert cautious.tokens == greedy.tokens
    assert sum(cautious.stats.early_by_layer.values()) == cautious.stats.rejected == 0
    assert cautious.stats.head_checks > 0


def test_a_rehearsing_head_earns_its_way_back():
    g = Guard(Threshold(0.5), 30, slack=0.3, prior=0.0, probe=2)
    g.reset()
    sure = Guess(5, 0.9, 0.05, 0.3, 2.0)
    assert [g.active(22) for _ in range(4)] == [False, True, False, True]    # every probe-th reach
    assert g.exit(22, sure) and g.dry(22)                                     # would exit: rehearsed only
    n = 0
    while g.dry(22):                     # break-even 22/30, bar 0.733 + 0.3 * 0.267 = 0.813
        g.observe(22, True)
        n += 1
    assert n == 8 and g.active(22) and not g.dry(22)                          # 1 - 0.8**8 >= 0.813 > 1 - 0.8**7
    g.observe(22, False)
    assert g.dry(22)                                                          # one miss at 0.83 drops it below


def test_rehearsed_exits_are_scored_against_the_final_layers_token():
    """A policy that rehearses every exit: the loop never exits, and each rehearsed guess
    hears whether it equals greedy's token at its position, in order."""
    from conftest import random_llama

    class Rehearse:
        def reset(self):
            self.guessed, self.heard = [], []

        def active(self, layer):
            return layer > 0                                    # the heads, not the context's exit

        def exit(self, layer, guess):
            self.guessed.append((layer, guess.token))
            return True

        def dry(self, layer):
            return True

        def observe(self, layer, accepted):
            self.heard.append((layer, accepted))
    model = random_llama(3, n_layers=4, vocab=13)
    heads = random_heads(model, [1, 2, 3], seed=3, noise=0.5)
    greedy = generate_greedy(model, [1, 2], 40)
    policy = Rehearse()
    ada = generate_ada(model, heads, [1, 2], 40, policy=policy)
    assert ada.tokens == greedy.tokens and sum(ada.stats.early_by_layer.values()) == 0
    per_step = len(heads.layers)
    expected = [(l, t == greedy.tokens[j // per_step + 1]) for j, (l, t) in enumerate(policy.guessed)]
    assert len(policy.guessed) == per_step * (len(greedy.tokens) - 1)
    assert policy.heard == expected
    assert any(ok for _, ok in expected) and not all(ok for _, ok in expected)   # both verdicts occur


def test_policy_specs_round_trip_and_bad_specs_are_refused():
    for p in (Threshold(0.6), Threshold({3: 0.5}, "margin"), Logistic({2: [0.1, 1, 2, 3, 4]}, {2: 0.7}),
              Guard(Logistic({2: [0, 0, 0, 0, 0]}, 0.5), 30, slack=0.2)):
        q = from_spec(p.spec(), 30)
        assert q.spec() == p.spec()
    for bad in ({"kind": "nope"}, {"kind": "threshold"}, {"kind": "threshold", "threshold": 2.0},
                {"kind": "logistic", "weights": {2: [1, 2]}, "threshold": 0.5}, {}, None):
        with pytest.raises(InputError):
            from_spec(bad, 30)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        Threshold(-0.2)


def test_fit_and_choose_thresholds():
    """The fitted classifier ranks right guesses above wrong ones, and coordinate ascent
    finds the best per-head thresholds of a known objective."""
    from conftest import random_llama
    model = random_llama(9, n_layers=4, vocab=11)
    heads = random_heads(model, [1, 2, 3], seed=1, noise=1.0)
    rec = Recorder(model, heads)
    traces = [rec.record(p, generate_greedy(model, p, 30).tokens, 30, set()) for p in ([1], [2, 3], [4, 5, 6], [7])]
    w = fit_logistic(traces, [1, 2, 3])
    pol = Logistic(w, 0.5)
    for l in (1, 2, 3):
        pairs = [(pol.prob(l, t.guesses[j][l]), t.guesses[j][l].token == t.tokens[j + 1])
                 for t in traces for j in range(len(t.tokens) - 1)]
        right = [p for p, ok in pairs if ok]
        wrong = [p for p, ok in pairs if not ok]
        if right and wrong:
            assert sum(right) / len(right) >= sum(wrong) / len(wrong)
    target = {1: 0.9, 2: None, 3: 0.5}
    obj = lambda th: -sum(abs((th[l] or 2.0) - (target[l] or 2.0)) for l in th)
    best, score = choose_thresholds(obj, [1, 2, 3])
    assert best == target and score == 0


def test_a_response_made_elsewhere_is_cut_or_regenerated():
    """A trace follows this model's greedy path: a response that leaves it is cut just
    before, or, with regenerate, replaced by the model's own greedy response."""
    from conftest import random_llama
    model = random_llama(8, n_layers=3, vocab=11)
    rec = Recorder(model, random_heads(model, [1, 2], seed=1, noise=1.0))
    greedy = generate_greedy(model, [4, 2], 20).tokens
    other = greedy[:5] + [(greedy[5] + 1) % 11] + greedy[6:]          # leaves greedy's path at token 5
    assert rec.record([4, 2], other, 20, set()).tokens == greedy[:5]
    full = rec.record([4, 2], other, 20, set(), regenerate=True)
    assert full.tokens == greedy and len(full.guesses) == len(greedy)


@given(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=40), longest=st.integers(1, 6))
def test_lookup_finds_the_longest_most_recent_repeat(tokens, longest):
    """lookup() against its definition, written the slow way: for the largest k <= longest
    whose last-k suffix occurs earlier, the token after its most recent earlier occurrence."""
    n = len(tokens)
    want = (None, 0)
    for k in range(min(longest, n - 1), 0, -1):
        ends = [e for e in range(k, n) if tokens[e - k:e] == tokens[n - k:]]    # e: the token after an occurrence
        if ends:
            want = (tokens[max(ends)], k)
            break
    assert lookup(tokens, longest) == want
    g = Guess(2, 0.9, 0.05, 0.3, 2.0)
    c = in_context(g, want)
    assert c[:5] == g[:5]
    assert (c.echo, c.clash) == ((0, 0) if want[0] is None else (want[1], 0) if want[0] == 2 else (0, want[1]))


def test_the_context_moves_the_classifier():
    """A Logistic policy reads echo and clash: the same head output exits when it repeats
    what the context predicts and stays when it contradicts it; weights for the first four
    features only (an older heads file) ignore the context."""
    g = Guess(7, 0.6, 0.3, 1.0, 3.0)
    context = [1, 2, 3, 7, 9, 1, 2, 3]          # after 1 2 3 came 7: k = 3
    pol = Logistic({4: [-1.0, 1.0, 0, 0, 0, 1.0, -1.0]}, 0.5)
    assert pol.exit(4, in_context(g, lookup(context)))
    assert not pol.exit(4, in_context(g._replace(token=8), lookup(context)))
    assert not pol.exit(4, g)
    old = Logistic({4: [-1.0, 1.0, 0, 0, 0]}, 0.5)
    assert old.prob(4, in_context(g, lookup(context))) == old.prob(4, g)


def test_a_replay_sees_the_context_the_real_loop_sees():
    """The loop hands the policy each guess with its context features; a replay of the
    trace hands it the same ones, the prompt's repeats included."""
    from conftest import random_llama

    class Heard(Threshold):
        def reset(self):
            self.heard = []

        def exit(self, layer, guess):
            self.heard.append((layer, guess.echo, guess.clash))
            return super().exit(layer, guess)

    model = random_llama(4, n_layers=4, vocab=11)
    heads = random_heads(model, [1, 2, 3], seed=2, noise=1.0)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3]
    real_policy, sim_policy = Heard(0.6), Heard(0.6)
    real = generate_ada(model, heads, prompt, 30, policy=real_policy)
    rec = Recorder(model, heads)
    trace = rec.record(prompt, generate_greedy(model, prompt, 30).tokens, 30, set())
    sim, _ = rec.replay([trace], sim_policy, exact=True)
    assert stats_dict(sim[0]) == stats_dict(real.stats)
    assert sim_policy.heard == real_policy.heard
    assert any(e or c for _, e, c in real_policy.heard)
    never = Heard(1.0)
    never.exit = lambda layer, guess: Heard.exit(never, layer, guess) and False    # listens, never exits
    greedy = generate_ada(model, heads, prompt, 30, policy=never)
    assert never.heard == [(l, trace.in_context(j, l).echo, trace.in_context(j, l).clash)
                           for j in range(len(greedy.tokens) - 1) for l in (1, 2, 3)]   # what the fit reads


def test_the_context_exit_before_layer_1_keeps_parity_and_replays():
    """A policy that names layer 0 exits there with the context's token (prompt lookup):
    no check is spent, the output stays greedy's, and a replay reproduces the run."""
    from conftest import random_llama
    model = random_llama(4, n_layers=4, vocab=11)
    heads = random_heads(model, [2], seed=2, noise=1.0)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3]
    greedy = generate_greedy(model, prompt, 40)
    policy = Logistic({0: [-2.0, 0, 0, 0, 0, 1.5, 0]}, 0.5)     # exit on a repeat of 2 tokens or more
    real = generate_ada(model, heads, prompt, 40, policy=policy)
    assert real.tokens == greedy.tokens
    check_same_cache(real.cache, greedy.cache)
    s = real.stats
    assert s.early_by_layer[0] > 0 and s.head_checks == 0
    assert s.accepted + s.rejected + s.discarded == s.early_by_layer[0]
    rec = Recorder(model, heads)
    sim, _ = rec.replay([rec.record(prompt, greedy.tokens, 40, set())], policy, exact=True)
    assert stats_dict(sim[0]) == stats_dict(real.stats)


def test_the_cost_model_times_every_row_count_the_check_and_the_lm_head():
    """row_costs (simulate.py's and bench.py --row-cost's cost model): a positive time per
    layer call for every row count asked for, in any iterable, and for a check and the LM head."""
    from conftest import random_llama
    from record import row_costs
    model = random_llama(0, n_layers=4, vocab=61)
    cost = row_costs(model, random_heads(model, [1, 2], 0, 1.0), rows=range(1, 4), context=8, repeats=2)
    assert set(cost) == {1, 2, 3, "logits", ("logits", 2), ("logits", 3), "check"} and all(v > 0 for v in cost.values())
    assert set(row_costs(model, None, rows=(2,), context=8, repeats=1)) == {2, "logits", ("logits", 2)}
    short = random_llama(0, n_layers=2, max_pos=16)       # a context shorter than the default 300 positions
    assert set(row_costs(short, None, rows=(1, 8), repeats=1)) == {1, 8, "logits", ("logits", 8)}
    with pytest.raises(InputError, match="too short"):
        row_costs(random_llama(0, n_layers=2, max_pos=8), None, rows=(1, 8), repeats=1)



@pytest.mark.parametrize("n", [12, 300])
def test_wrong_branch_guesses_are_the_loops_own_bits(n):
    """--exact computes a wrong branch's guesses as the loop does: the prompt as prefill runs
    it, every later row in a decoding call. On an int8 model, where those are batch-invariant,
    the guesses are then bit for bit the ones the loop would see (a long prompt's masked call
    gives other bits: a 300-token prompt was one such case)."""
    import random
    import torch
    from test_parity import quantized_llama
    model = quantized_llama(1, 3, (1, 2, 32), 128, 61, max_pos=1024)
    heads = random_heads(model, [1, 2], seed=3, noise=1.0)
    rnd = random.Random(n)
    prompt = [rnd.randrange(61) for _ in range(n)]
    rec = Recorder(model, heads)
    trace = rec.record(prompt, generate_greedy(model, prompt, 6).tokens, 6, set())
    d, toks = n + 2, [5, 7, 11]                          # a branch after greedy's first two tokens
    got = rec.branch(trace, d, toks)
    rows = (prompt + trace.tokens)[:d] + toks
    with torch.inference_mode():                         # the loop's way: prefill, then one row at a time
        cache = model.new_cache(len(rows))
        model.run_layers(model.embed(torch.tensor([prompt])), 0, cache, 0, 2)
        for p in range(n, len(rows)):
            h, start = model.embed(torch.tensor([[rows[p]]])), 0
            for l in (1, 2):
                h = model.run_layers(h, p, cache, start, l)
                start = l
                if p >= d:
                    assert got[(d, tuple(toks[:p - d + 1]))][l] == heads.check(l, h[0, -1]), (p, l)


def test_scaled_costs_keep_one_row_and_scale_what_more_rows_add():
    """scaled_cost(cost, f): every call of r > 1 rows (layer or LM head) costs one row's plus
    f times its extra; one row, the check and f = 1 leave the model as it is; f = 0 makes
    the prediction the one with free extra rows, which is at least the measured one."""
    from adadecode import Stats
    cost = {1: 1.0, 2: 1.5, 4: 3.0, "logits": 10.0, ("logits", 4): 14.0, "check": 0.25}
    assert scaled_cost(cost, 1.0) == cost
    assert scaled_cost(cost, 0.5) == {1: 1.0, 2: 1.25, 4: 2.0, "logits": 10.0, ("logits", 4): 12.0, "check": 0.25}
    assert scaled_cost(cost, 0.0) == {1: 1.0, 2: 1.0, 4: 1.0, "logits": 10.0, ("logits", 4): 10.0, "check": 0.25}
    st = Stats(n_layers=2)
    st.count_call(1, 2)
    st.count_call(4, 2)
    st.head_checks = 3
    st.verify_rows.update({1: 1, 4: 1})
    pred = [figures([st], [5], scaled_cost(cost, f))["predicted_speedup"] for f in (1.0, 0.5, 0.0)]
    assert pred[0] < pred[1] < pred[2]
    greedy = 4 * (2 * 1.0 + 10.0)
    assert pred[2] == pytest.approx(greedy / (4 * 1.0 + 3 * 0.25 + 2 * 10.0))


def test_the_predicted_speedup_prices_each_verification_by_its_rows():
    """figures charges each verification's LM head call at the cost of its rows (the largest
    row count measured up to them), and greedy's at one row's; a cost model without per-row
    LM head figures charges every verification one row's, as it did before."""
    from adadecode import Stats
    st = Stats(n_layers=2)
    st.count_call(1, 2)                                   # two single-layer calls of 1 row,
    st.count_call(3, 2)                                   # two of 3 rows
    st.verify_rows.update({1: 2, 3: 1, 5: 1})
    cost = {1: 1.0, 2: 1.5, 3: 2.0, "logits": 10.0, ("logits", 2): 12.0, ("logits", 4): 20.0, "check": 0.0}
    greedy = 3 * (2 * 1.0 + 10.0)                         # 4 tokens: 3 after the first, 2 layers and the LM head each
    assert figures([st], [4], cost)["predicted_speedup"] == pytest.approx(greedy / (2 * 1.0 + 2 * 2.0 + 2 * 10.0 + 12.0 + 20.0))
    del cost[("logits", 2)], cost[("logits", 4)]
    assert figures([st], [4], cost)["predicted_speedup"] == pytest.approx(greedy / (2 * 1.0 + 2 * 2.0 + 4 * 10.0))
