"""
What the simulator needs from the real model, measured once: greedy's traces (Recorder:
every head's guess at every position, recorded teacher-forced; the guesses on a wrong
branch, computed when a replay asks for them), cached on disk (traces_for, keyed by the
prompts, the heads file and the dtype), and this machine's cost of a layer call by the
number of rows in it (row_costs), which turns a replayed schedule into a predicted speedup.
simulate.py replays; this file runs the model.
"""
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from model import InputError, ROW_BY_ROW, argmax
from quantize import precision
from simulate import Trace, replay


class Recorder:
    """Records traces with the real model and heads, and computes wrong-branch guesses
    exactly when a replay asks for them (`branch`)."""

    def __init__(self, model, heads):
        self.model, self.heads = model, heads
        self.layers = [l for l in heads.layers if l < model.args.n_layers]

    @torch.inference_mode()
    def record(self, prompt, tokens, max_new_tokens, eos, regenerate=False):
        """The trace of greedy's `tokens` for `prompt`, teacher-forced: the prompt in one call,
        as prefill runs it, then the response in calls of ROW_BY_ROW rows, whose rows are
        computed as decoding computes them (bit for bit in int8, where the forward is
        batch-invariant). Where the final layer's argmax here disagrees with `tokens` (a
        response made elsewhere, by float32 `transformers` for an int8 model, say) the
        trace stops just before, unless `regenerate`: then this model's own greedy
        response replaces `tokens` (once), so that the trace runs to its full length."""
        m, n, L = self.model, len(prompt), self.model.args.n_layers
        ids = torch.tensor([prompt + tokens], device=m.device)
        cache, rows, pred = m.new_cache(ids.shape[1]), {l: [] for l in self.layers}, []
        for a in [0] + list(range(n, ids.shape[1], ROW_BY_ROW)):
            b = n if a == 0 else min(a + ROW_BY_ROW, ids.shape[1])
            h, start = m.embed(ids[:, a:b]), 0
            for l in self.layers + [L]:
                h = m.run_layers(h, a, cache, start, l)
                start = l
                if l in self.layers and a > 0:
                    rows[l] += self.heads.check_rows(l, h[0])
            pred += argmax(m.logits(h[0, -1:] if a == 0 else h[0])).tolist()   # pred[j]: the final layer's tokens[j]
        keep = next((j for j, (a, b) in enumerate(zip(pred, tokens)) if a != b), len(tokens))
        if keep < len(tokens) and regenerate:
            from adadecode import generate_greedy
            return self.record(prompt, generate_greedy(m, prompt, max_new_tokens, eos).tokens, max_new_tokens, eos)
        if keep < len(tokens):
            tokens, max_new_tokens = tokens[:keep], keep
        guesses = [{l: rows[l][j] for l in self.layers} for j in range(len(tokens))]
        return Trace(list(prompt), list(tokens), max_new_tokens, sorted(eos), guesses)

    @torch.inference_mode()
    def branch(self, trace, d, toks):
        """Guesses on a wrong branch: tokens `toks` at positions d, d+1, ... after greedy's
        context before d. Computed on a fresh cache as the loop computes them: the prompt in
        one call, as prefill runs it, then greedy's tokens before d and the branch in a
        decoding call (row by row in attention, so in int8 and int4 bit for bit the loop's);
        returns {(d, toks[:k+1]): {layer: Guess}} for every k. The trace must be this
        model's and these heads' (recorded here, or read back from a cache keyed by them)."""
        m, n = self.model, trace.prompt_len
        ids = torch.tensor([trace.prompt + trace.tokens[:d - n] + toks], device=m.device)
        cache, out = m.new_cache(ids.shape[1]), {}
        m.run_layers(m.embed(ids[:, :n]), 0, cache, 0, self.layers[-1])
        h, start = m.embed(ids[:, n:]), 0
        for l in self.layers:
            h = m.run_layers(h, n, cache, start, l)
            start = l
            for k, g in enumerate(self.heads.check_rows(l, h[0, d - n:])):
                out.setdefault((d, tuple(toks[:k + 1])), {})[l] = g
        return out

    def replay(self, traces, policy, max_pending=None, exact=False):
        from adadecode import default_max_pending
        max_pending = default_max_pending(self.model) if max_pending is None else max_pending
        return replay(traces, self.layers, self.model.args.n_layers, self.model.args.max_seq_len, policy,
                      max_pending, self.branch if exact else None)


def row_costs(model, heads, rows=(1, 2, 3, 4, 5, 6), context=300, repeats=9):
    """Seconds per single-layer call for each row count (all layers timed together, at a
    realistic cache length), per head check, and per LM-head call, on one row ("logits":
    greedy's) and on each larger row count r of `rows` (("logits", r): a verification of r
    rows): the cost model that turns a replay into a predicted speedup on this machine. A
    model with a shorter context than `context` + the rows is timed at the longest cache it
    allows.

    The calls take turns in rounds (the first a warm-up), and each round also times a
    one-row call of all layers, its reference. A figure is the median of its ratios to
    the reference of its own round, times the references' median: a VM's speed drifts
    from second to second, and a prediction depends only on the costs' ratios, which this
    measures inside one round (on a 2-core AMD EPYC, four cost models in a row priced the
    same replays 0.02-0.04x apart this way, 0.05-0.09x apart with each figure's own median
    in the same minutes)."""
    from adadecode import sync
    m, L, rows = model, model.args.n_layers, list(rows)
    context = min(context, m.args.max_seq_len - max(rows) - 1)
    if context < 1:
        raise InputError(f"the model's context ({m.args.max_seq_len} positions) is too short to time calls of "
                         f"{max(rows)} rows")
    with torch.inference_mode():
        cache = m.new_cache(context + max(rows) + 1)
        m.run_layers(m.embed(torch.zeros(1, context, dtype=torch.long, device=m.device)), 0, cache)
        hs = {r: torch.randn(1, r, m.args.dim, dtype=m.dtype, device=m.device) for r in set(rows) | {1}}
        h = hs[max(rows)]
        x, one = h[0, -1], h[:, -1:]

        def layer_call(r):
            cache.truncate(context)
            sync(m.device)
            t = time.perf_counter()
            m.run_layers(hs[r], context, cache)
            sync(m.device)
            return (time.perf_counter() - t) / L

        calls = [("logits", lambda i: argmax(m.logits(one)).tolist())]
        calls += [(("logits", r), lambda i, r=r: argmax(m.logits(h[:, -r:])).tolist()) for r in rows if r > 1]
        if heads is not None:
            calls.append(("check", lambda i: heads.check(heads.layers[i % len(heads.layers)], x)))
        refs, ratios = [], {k: [] for k in rows + [name for name, _ in calls]}
        for i in range(repeats + 1):
            ref = layer_call(1)
            t = {r: layer_call(r) for r in rows}
            for name, fn in calls:           # each ends in a host transfer, so the device has finished
                # as in decoding, a whole token's weights have streamed through the CPU's caches
                # since this call last ran: timed back to back, its weights cached, a check
                # costs about half as much
                cache.truncate(context)
                m.run_layers(one, context, cache)
                sync(m.device)
                s = time.perf_counter()
                fn(i)
                t[name] = time.perf_counter() - s
            if i > 0:
                refs.append(ref)
                for k, v in t.items():
                    ratios[k].append(v / ref)
    median = lambda v: sorted(v)[len(v) // 2]
    return {k: median(v) * median(refs) for k, v in ratios.items()}


def load_traces(rec, seqs, max_new_tokens, eos, path, categories=None):
    """Traces for (prompt, response) pairs, cached as JSON Lines at `path` (written whole,
    then renamed). A trace whose first token already disagrees with the response is dropped."""
    if path.exists():
        return [Trace.from_json(json.loads(l)) for l in path.read_text().splitlines()]
    traces = [rec.record(p, r, max_new_tokens, eos, regenerate=True) for p, r in seqs]
    for t, c in zip(traces, categories or []):
        t.category = c
    traces = [t for t in traces if t.tokens]
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(t.to_json()) + "\n" for t in traces))
    tmp.replace(path)
    return traces


def traces_for(rec, tok, folder, heads_path, prompts, max_new_tokens, raw=False):
    """Traces of the model's greedy responses to `prompts` (responses and traces cached)."""
    from adadecode import prompt_token_ids
    from checkpoint import eos_ids
    from train_data import generate_responses, response_cache
    ids = prompt_token_ids(rec.model, tok, prompts, max_new_tokens, raw)
    resp = generate_responses(folder, ids, max_new_tokens, response_cache(folder, max_new_tokens))
    hkey = hashlib.sha256(Path(heads_path).read_bytes()).hexdigest()[:8]
    # the last item is the traces' version: 6 since the exit check moved into C (fused.head_check),
    # whose figures differ from the PyTorch steps' in the last bits, 7 since int8's activations are
    # 16-bit integers instead of two int8 levels (other last bits), so older traces are recorded again
    key = hashlib.sha256(json.dumps([ids, hkey, max_new_tokens, precision(rec.model), 7]).encode()).hexdigest()[:12]
    return load_traces(rec, list(zip(ids, resp)), max_new_tokens, eos_ids(rec.model, tok),
                       response_cache(folder).parent / f"traces-{key}.jsonl", [p.get("category", "") for p in prompts])


def default_traces(split="held-out", n=400, max_new_tokens=128, heads_path=None):
    """(Recorder, traces) for the default model and heads on train_heads.py's prompts of the
    heads' domains: the held-out split (for choosing policies) or the training split."""
    from adadecode import DEFAULT_HEADS, setup
    from checkpoint import prepare_default_model
    from train_data import default_split
    heads_path = heads_path or DEFAULT_HEADS
    model, tok, heads = setup(None, heads_path, "cpu", torch.float32)
    train, held = default_split(n, heads.meta.get("training", {}).get("domains", "code"))
    rec = Recorder(model, heads)
    return rec, traces_for(rec, tok, prepare_default_model(), heads_path, held if split == "held-out" else train,
                           max_new_tokens)
