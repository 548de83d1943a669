"""
An exit-policy simulator: AdaDecode's schedule for any exit policy, replayed in about a
second from greedy decoding's trace, recorded once.

A trace holds, per prompt, the prompt's and greedy's tokens and, for every generated
position and every head, the head's Guess (token and confidence features). A replay runs the *real*
`generate_ada` loop with the model and the heads replaced by lookups into the trace, so
the schedule (exits, max_pending, joins, verification, rollbacks, the policy's feedback)
and the Stats are the ones the real loop computes: there is no second copy of the loop.

Wrong branches: after a wrong early token, the following tokens' heads see a context
greedy never saw, so a greedy trace cannot say what they guess. With the model at hand
(`Recorder.replay(..., exact=True)`) the simulator computes those guesses (a few rows
against greedy's KV cache) and keeps them in the trace; without it, it assumes a head
on a wrong branch guesses what it guessed at the same position on greedy's path, and
counts those approximations (`branch_misses`). Recording traces and measuring the cost of
a layer call take the real model: record.py.

    python simulate.py                                  # held-out code prompts, shipped heads: policy table
    python simulate.py --prompts prompts.jsonl --n 44 --max-new-tokens 128
    python simulate.py --fit                            # fit the exit policy, store it in the heads file
    python simulate.py --dtype int8 --sweep-max-pending 3 4 5 6 7 8   # max_pending, one cost model
    python simulate.py --dtype int8 --extra-row-scale 0.5 0         # were extra rows half price, or free
"""
import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from checkpoint import check_model_name, resolve_checkpoint
from exits import CONTEXT, FEATURES, Guard, Logistic, Threshold, context_guess, in_context, lookup
from heads import Guess
from kvcache import KVCache
from model import InputError


@dataclass
class Trace:
    """Greedy decoding of one prompt, seen by the heads."""
    prompt: list                  # the prompt's token ids
    tokens: list                  # greedy's generated tokens (the first comes from the prefill)
    max_new_tokens: int           # the budget of the run the trace stands for
    eos: list
    guesses: list                 # guesses[j][layer]: Guess of the head after `layer` on the row of tokens[j]
    branches: dict = field(default_factory=dict)   # (first wrong position, branch tokens) -> {layer: Guess}
    category: str = ""

    @property
    def prompt_len(self):
        return len(self.prompt)

    def in_context(self, j, layer):
        """The head's guess on the row of tokens[j], with what the context up to there says
        comes next (exits.in_context), as the loop sees it on greedy's path; at layer 0
        (CONTEXT) the context's own guess, or None where it has none."""
        found = lookup(self.prompt + self.tokens[:j + 1])
        return context_guess(found) if layer == CONTEXT else in_context(self.guesses[j][layer], found)

    def to_json(self):
        return {"prompt": self.prompt, "tokens": self.tokens, "max_new_tokens": self.max_new_tokens,
                "eos": sorted(self.eos), "guesses": [{str(l): list(g) for l, g in row.items()} for row in self.guesses],
                "category": self.category}

    @classmethod
    def from_json(cls, d):
        return cls(d["prompt"], d["tokens"], d["max_new_tokens"], d["eos"],
                   [{int(l): Guess(int(g[0]), *g[1:]) for l, g in row.items()} for row in d["guesses"]],
                   category=d.get("category", ""))


class _Cache:
    """Only the lengths of a KVCache, with the same position check."""

    def __init__(self, n_layers):
        self.lengths = [0] * n_layers

    truncate = KVCache.truncate          # it only moves the lengths


class Replay:
    """Stands in for the model and the heads while generate_ada replays one trace. A
    "hidden state" is a row [position, token]; the heads look their guess up."""

    def __init__(self, trace, layers, n_layers, max_seq_len, branch=None):
        self.trace, self.layers, self.branch = trace, list(layers), branch
        self.args = SimpleNamespace(n_layers=n_layers, max_seq_len=max_seq_len)
        self.device = torch.device("cpu")
        self.tok = {}                 # position -> the token last embedded there
        self.wrong = set()            # positions whose current token is not greedy's
        self.misses = 0
        self.last_right = None        # whether the last guess was greedy's token (for the oracle)

    # --- the model's side ------------------------------------------------------------
    def new_cache(self, max_len):
        return _Cache(self.args.n_layers)

    def embed(self, x):                                    # (1, T) -> (1, T, 2): [position unknown, token]
        return torch.stack([torch.full(x.shape, -1, dtype=torch.long), x], dim=-1)

    def run_layers(self, h, pos, cache, start=0, end=None):
        T = h.shape[1]
        for l in range(start, self.args.n_layers if end is None else end):
            if cache.lengths[l] != pos:
                raise ValueError(f"layer {l}: writing at position {pos}, but it holds {cache.lengths[l]} entries")
            cache.lengths[l] = pos + T
        h = h.clone()
        h[0, :, 0] = torch.arange(pos, pos + T)
        if start == 0:                                     # new rows: remember which token sits where
            n, greedy = self.trace.prompt_len, self.trace.tokens
            for p, t in zip(range(pos, pos + T), h[0, :, 1].tolist()):
                self.tok[p] = t
                if p >= n:               # past greedy's last token, every position is off its path
                    (self.wrong.discard if p - n < len(greedy) and t == greedy[p - n] else self.wrong.add)(p)
        return h

    def _next(self, p):
        """Greedy's next token after position p, where the context up to p is greedy's."""
        j = p - self.trace.prompt_len + 1
        on_path = not any(q <= p for q in self.wrong)
        return self.trace.tokens[j] if on_path and 0 <= j < len(self.trace.tokens) else 0

    def logits(self, h):                                   # one-hot "logits": argmax is the next token
        ps = h[..., 0].reshape(-1).tolist()
        nxt = [self._next(p) for p in ps]
        z = torch.zeros(len(ps), max(nxt) + 1)
        z[torch.arange(len(ps)), torch.tensor(nxt)] = 1.0
        return z.reshape(*h.shape[:-1], -1)

    # --- the heads' side -------------------------------------------------------------
    def check(self, layer, h):
        p, n = int(h[0]), self.trace.prompt_len
        j = p - n
        bad = [q for q in self.wrong if q <= p]
        if not bad:
            g = self.trace.guesses[j][layer]
        else:
            d = min(bad)
            key = (d, tuple(self.tok[q] for q in range(d, p + 1)))
            if key not in self.trace.branches and self.branch is not None:
                self.trace.branches.update(self.branch(self.trace, d, list(key[1])))
            if key in self.trace.branches:
                g = self.trace.branches[key][layer]
            else:
                self.misses += 1
                g = self.trace.guesses[min(j, len(self.trace.guesses) - 1)][layer]   # approximation: greedy's guess here
        self.last_right = not bad and j + 1 < len(self.trace.tokens) and g.token == self.trace.tokens[j + 1]
        return g


class Oracle:
    """Exit exactly when the head's guess is greedy's next token (simulation only): the
    ceiling for these heads at this max_pending (the context's exit left out)."""

    def __init__(self, replay_ref):
        self.ref = replay_ref

    def reset(self):
        pass

    def active(self, layer):
        return layer != CONTEXT

    def exit(self, layer, guess):
        return bool(self.ref[0].last_right)

    def dry(self, layer):
        return False

    def observe(self, layer, accepted):
        pass


def replay(traces, layers, n_layers, max_seq_len, policy, max_pending=5, branch=None):
    """Run generate_ada on every trace with `policy`; return the per-trace Stats and the
    number of branch guesses that had to be approximated."""
    from adadecode import generate_ada
    stats, misses, ref = [], 0, [None]
    if isinstance(policy, str) and policy == "oracle":
        policy = Oracle(ref)
    for t in traces:
        r = ref[0] = Replay(t, layers, n_layers, max_seq_len, branch)
        res = generate_ada(r, r, t.prompt, t.max_new_tokens, set(t.eos), policy=policy,
                           max_pending=max_pending)
        if res.tokens != t.tokens:
            raise AssertionError("a replay did not reproduce greedy's tokens")   # cannot happen: verification
        stats.append(res.stats)
        misses += r.misses
    return stats, misses


def lm_head_cost(cost, rows):
    """The cost model's seconds for an LM head call on `rows` rows: the largest row count
    measured up to `rows` (one row: "logits")."""
    measured = [r for r in (k[1] for k in cost if isinstance(k, tuple) and k[0] == "logits") if r <= rows]
    return cost[("logits", max(measured))] if measured else cost["logits"]


def scaled_cost(cost, f):
    """The cost model with every call of more than one row (layer calls and LM head calls)
    charged one row's cost plus f times what its other rows add: what AdaDecode would gain
    here from a flatter row curve (f 0: extra rows free, the ideal for this machine's
    one-row costs; f 1: the model as measured)."""
    one = lambda k: cost[1] if isinstance(k, int) else cost["logits"]
    return {k: one(k) + f * (v - one(k)) if isinstance(k, (int, tuple)) else v for k, v in cost.items()}


def figures(stats, n_tokens, cost=None):
    """Aggregate over traces: ideal speedup, early and rejected rates, rows per call; with
    a cost model {rows: seconds per layer call, "check": s, "logits": s (one row), ("logits",
    rows): s (optional)}, the predicted speedup: each verification priced by its rows."""
    L = stats[0].n_layers
    greedy_rows = sum(max(n - 1, 0) * L for n in n_tokens)
    seq = sum(st.sequential_layers for st in stats)
    acc, rej = sum(st.accepted for st in stats), sum(st.rejected for st in stats)
    early = sum(sum(st.early_by_layer.values()) for st in stats)
    f = {"ideal_speedup": greedy_rows / max(seq, 1), "early_rate": early / max(sum(n_tokens), 1),
         "rejection_rate": rej / max(acc + rej, 1),
         "rows_per_call": sum(st.layer_rows for st in stats) / max(sum(st.layer_calls for st in stats), 1),
         "head_checks_per_token": sum(st.head_checks for st in stats) / max(sum(n_tokens), 1)}
    if cost:
        greedy_t = sum(max(n - 1, 0) for n in n_tokens) * (L * cost[1] + cost["logits"])
        ada_t = sum(c * cost[min(r, max(k for k in cost if isinstance(k, int)))] for st in stats
                    for r, c in st.rows_hist.items())
        ada_t += sum(st.head_checks for st in stats) * cost["check"]
        ada_t += sum(c * lm_head_cost(cost, r) for st in stats for r, c in st.verify_rows.items())
        f["predicted_speedup"] = greedy_t / ada_t
    return f


# --- choosing a policy -----------------------------------------------------------

def fit_logistic(traces, layers, l2=1e-3, steps=200):
    """Per head: logistic regression of "the head's guess is greedy's next token" on the
    guess's features (its context's included), over every greedy-path position of the traces."""
    weights = {}
    for l in layers:
        X, y = [], []
        for t in traces:
            for j in range(len(t.tokens) - 1):
                g = t.in_context(j, l)
                if g is None:
                    continue
                X.append([1.0] + [getattr(g, f) for f in FEATURES])
                y.append(float(g.token == t.tokens[j + 1]))
        X, y = torch.tensor(X, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
        mu, sd = X[:, 1:].mean(0), X[:, 1:].std(0).clamp(min=1e-6)
        Xs = torch.cat([X[:, :1], (X[:, 1:] - mu) / sd], 1)          # standardised, for a well-posed fit
        w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(Xs @ w, y) + l2 * (w[1:] ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        w = w.detach()
        raw = torch.cat([(w[0] - (w[1:] * mu / sd).sum())[None], w[1:] / sd])   # back to raw features
        weights[l] = raw.tolist()
    return weights


def choose_thresholds(evaluate, layers, grid=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98), rounds=2,
                      start=0.75):
    """Coordinate ascent over per-head thresholds: `evaluate({layer: t})` returns the
    objective (higher is better). A head may also be switched off (threshold None)."""
    best = {l: start for l in layers}
    score = evaluate(best)
    for _ in range(rounds):
        changed = False
        for l in layers:
            for t in list(grid) + [None]:
                trial = {**best, l: t}
                if trial == best:
                    continue
                s = evaluate(trial)
                if s > score + 1e-9:
                    best, score, changed = trial, s, True
        if not changed:
            break
    return best, score


def operating_point(traces, policy, layers):
    """Per head, on greedy's path: the share of positions where the policy would exit
    (coverage) and the share of those exits that are right (precision), as the check
    runs at inference (shortlist softmax, the policy's own rule; a guard left out)."""
    policy = getattr(policy, "policy", policy)
    table = {}
    for l in layers:
        sure = right = n = agree = 0
        for t in traces:
            for j in range(len(t.tokens) - 1):
                g = t.in_context(j, l)
                n += 1
                if g is None:
                    continue
                agree += g.token == t.tokens[j + 1]
                if policy.active(l) and policy.exit(l, g):
                    sure += 1
                    right += g.token == t.tokens[j + 1]
        table[l] = {"coverage": sure / max(n, 1), "precision": right / sure if sure else float("nan"),
                    "agreement": agree / max(n, 1)}
    return table


def _drop_none(th):
    return {l: t for l, t in th.items() if t is not None}


# --- command line ----------------------------------------------------------------

def print_operating_point(op):
    print("held-out operating point (the check as it runs, the policy's rule, on greedy's path):")
    for l, r in op.items():
        print(f"  {'the context (layer 0)' if l == CONTEXT else f'head after layer {l}'}: agreement {r['agreement']:.3f}, coverage {r['coverage']:.3f}, "
              f"precision {r['precision']:.3f}")


def print_row(name, f, end="\n"):
    pred = f.get("predicted_speedup")
    print(f"{name:<34} {f['ideal_speedup']:6.3f}x  {'-' if pred is None else format(pred, '6.3f') + 'x':>8}  "
          f"{f['early_rate']:6.1%}  {f['rejection_rate']:6.1%}  {f['rows_per_call']:5.2f}  {f['head_checks_per_token']:5.2f}",
          end=end)


def main(argv=None):
    from adadecode import DEFAULT_HEADS, default_max_pending, setup
    from checkpoint import prepare_default_model
    from cli import default_device, read_prompts
    from exits import from_spec
    from record import Recorder, row_costs, traces_for
    from train_data import default_split
    ap = argparse.ArgumentParser(description="Replay AdaDecode's schedule for exit policies from recorded greedy traces.")
    ap.add_argument("--model", help="a Llama-family or Qwen2 checkpoint folder, or a hub id (org/name) "
                    "(default: SmolLM2-135M-Instruct)")
    ap.add_argument("--heads", help="exit heads file (default: heads/smollm2-135m-instruct.safetensors)")
    ap.add_argument("--prompts", help="JSON Lines prompt file (default: the held-out split of train_heads.py's prompts)")
    ap.add_argument("--raw", action="store_true", help="no chat template")
    ap.add_argument("--n", type=int, default=400, help="prompts (train + held-out) of the default set, as train_heads.py")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-pending", type=int, help="as adadecode.py (default: 3 in int4, 7 in int8 (3 where its kernel has only AVX2), 5 otherwise)")
    ap.add_argument("--sweep-max-pending", type=int, nargs="+", metavar="N",
                    help="replay the heads file's policy at each of these max_pending values, every one priced by "
                         "the same cost model, print a row each and stop")
    ap.add_argument("--extra-row-scale", type=float, nargs="+", metavar="F",
                    help="with --sweep-max-pending (or alone, at the default max_pending): also the predicted "
                         "speedup were each call's rows past the first to cost F times what they cost here "
                         "(0: free), one column per F")
    ap.add_argument("--exact", action="store_true", help="compute wrong-branch guesses with the model (slower)")
    ap.add_argument("--dtype", choices=["int4", "int8", "float32"],
                    help="the model's dtype for the traces, the head checks and the cost model (default: as "
                         "adadecode.py and bench.py: int8 on the CPU, float32 on a GPU)")
    ap.add_argument("--device", help="where to record traces and measure the cost model: cuda when available, else cpu")
    ap.add_argument("--objective", choices=["ideal", "predicted"], default="ideal",
                    help="what --fit maximises: the ideal-hardware speedup, or the speedup predicted on this machine "
                         "by its measured row-cost model")
    ap.add_argument("--fit", action="store_true",
                    help="fit the exit policy (classifier on the training split, per-head thresholds on the held-out "
                         "split) and store it in the heads file")
    a = ap.parse_args(argv)
    try:
        for flag, value, least in (("--max-new-tokens", a.max_new_tokens, 1), ("--max-pending", a.max_pending, 0),
                                   ("--n", a.n, 4), *(("--sweep-max-pending", v, 0) for v in a.sweep_max_pending or [])):
            if value is not None and value < least:
                raise InputError(f"{flag} must be at least {least}, got {value}")
        for f in a.extra_row_scale or []:
            if not 0 <= f < float("inf"):
                raise InputError(f"--extra-row-scale must be a number from 0 up, got {f}")
        if a.extra_row_scale and a.fit:
            raise InputError("--extra-row-scale prices replays of the heads file's policy: give it without --fit")
        if a.sweep_max_pending and (a.fit or a.max_pending is not None):
            raise InputError(f"--sweep-max-pending replays its own max_pending values: give it without "
                             f"{'--fit' if a.fit else '--max-pending'}")
        if a.model:
            check_model_name(a.model)
        heads_path = a.heads or (DEFAULT_HEADS if not a.model else None)
        if not heads_path:
            raise InputError("--heads is needed for a model other than the default")
        prompts = read_prompts(a.prompts) if a.prompts else None      # a bad file is refused before loading
        model, tok, heads = setup(a.model, heads_path, a.device or default_device(),
                                  getattr(torch, a.dtype) if a.dtype else None)
        folder = resolve_checkpoint(a.model) if a.model else prepare_default_model()
        if prompts:
            train, held = [], prompts
        else:
            train, held = default_split(a.n, heads.meta.get("training", {}).get("domains", "code"))
        if a.fit and not train:
            raise InputError("--fit needs the default prompt set (a training split for the classifier)")
        if a.max_pending is None:
            a.max_pending = default_max_pending(model)
        rec = Recorder(model, heads)
        sets = {name: traces_for(rec, tok, folder, heads_path, ps, a.max_new_tokens, a.raw)
                for name, ps in (("held-out", held), ("train", train if a.fit else [])) if ps}
        held_t = sets["held-out"]
        n_tokens = [len(t.tokens) for t in held_t]
        print("measuring the row-cost model on this machine ...", file=sys.stderr)
        most = max([a.max_pending] + (a.sweep_max_pending or []))
        cost = row_costs(model, heads, rows=range(1, most + 2))      # every call size the replays make
        print("cost model: " + ", ".join(f"{k} rows {v * 1e3:.3f} ms" if isinstance(k, int) else
                                         f"logits {k[1]} rows {v * 1e3:.3f} ms" if isinstance(k, tuple) else
                                         f"{k} {v * 1e3:.3f} ms" for k, v in cost.items()) + " (per layer call / per call)")
        run = lambda policy: figures(rec.replay(held_t, policy, a.max_pending, a.exact)[0], n_tokens, cost)
        L = model.args.n_layers
        if a.sweep_max_pending or a.extra_row_scale:
            policy = from_spec(heads.meta["policy"], L) if "policy" in heads.meta else Threshold(0.75)
            scales = a.extra_row_scale or []
            print(f"\n{len(held_t)} held-out traces, {sum(n_tokens)} tokens, the heads file's policy"
                  f"{'' if 'policy' in heads.meta else ' (none: top-1 probability >= 0.75)'}")
            print(f"{'max_pending':<34} {'ideal':>7}  {'pred.':>8}  {'early':>6}  {'reject':>6}  {'rows':>5}  {'chk/t':>5}"
                  + "".join(f"  {f'x{f:g} rows':>10}" for f in scales))
            for n in a.sweep_max_pending or [a.max_pending]:
                stats = rec.replay(held_t, policy, n, a.exact)[0]
                print_row(f"{n}", figures(stats, n_tokens, cost), end="")
                print("".join(f"  {figures(stats, n_tokens, scaled_cost(cost, f))['predicted_speedup']:9.3f}x"
                              for f in scales))
            return 0
        print(f"\n{len(held_t)} held-out traces, {sum(n_tokens)} tokens, max_pending {a.max_pending}")
        print(f"{'policy':<34} {'ideal':>7}  {'pred.':>8}  {'early':>6}  {'reject':>6}  {'rows':>5}  {'chk/t':>5}")
        for t in (0.5, 0.75, 0.9):
            print_row(f"top-1 probability >= {t}", run(Threshold(t)))
        for t in (0.3, 0.5, 0.7):
            print_row(f"margin >= {t}", run(Threshold(t, "margin")))
        if "policy" in heads.meta:
            print_row("the heads file's policy", run(from_spec(heads.meta["policy"], L)))
            if not a.fit:
                print_operating_point(operating_point(held_t, from_spec(heads.meta["policy"], L),
                                                      [CONTEXT] + rec.layers))
        print_row("oracle (exit iff the guess is right)", run("oracle"))
        cats = sorted({t.category for t in held_t})
        if len(cats) > 1 and "policy" in heads.meta:      # per category: the paper's rule and the heads' policy
            by_cat = {c: [t for t in held_t if t.category == c] for c in cats}
            for c, ts in by_cat.items():
                n_c = [len(t.tokens) for t in ts]
                for name, pol in (("0.75", Threshold(0.75)), ("policy", from_spec(heads.meta["policy"], L))):
                    print_row(f"  {c}: {name}", figures(rec.replay(ts, pol, a.max_pending, a.exact)[0], n_c, cost))
        if a.fit:
            exits = [CONTEXT] + rec.layers                # the context's exit is one more candidate
            w = fit_logistic(sets["train"], exits)
            key = "ideal_speedup" if a.objective == "ideal" else "predicted_speedup"
            obj = lambda th: run(Guard(Logistic(w, _drop_none(th)), L))[key]     # the policy as it will run
            th, score = choose_thresholds(obj, exits)
            policy = Guard(Logistic(w, _drop_none(th)), L)
            print_row(f"fitted: logistic {th}", run(Logistic(w, _drop_none(th))))
            print_row("fitted, with the guard", run(policy))
            op = operating_point(held_t, policy, exits)
            print_operating_point(op)
            # heads the policy never checks stay in the file: a refit for other hardware (a GPU,
            # --objective ideal) may use them
            heads.meta["policy"] = policy.spec()
            heads.meta["operating_point"] = {str(l): op[l] for l in exits if l in heads.layers or th[l] is not None}
            tmp = Path(heads_path).with_suffix(".tmp.safetensors")
            heads.save(tmp)
            tmp.replace(heads_path)
            print(f"stored the policy in {heads_path}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from cli import run_cli
    sys.exit(run_cli(main))
