"""
Greedy decoding, AdaDecode, and self-speculative decoding, all token-exact with greedy.

AdaDecode (Wei et al., ICML 2025): when an exit head after layer l is confident about
the next token, emit it at once and start it at layer 1. The layers the early token
skipped are deferred, not skipped: its rows wait with their hidden states and join the
next token's layer calls exactly where they are needed, batched. When rows reach the
top, the full model verifies every early token; at the first mismatch the wrong token
and everything after it are dropped and every layer's cache is cut back. Before layer 1
the context itself may exit, with prompt lookup's token (exits.context_guess), if the
policy names layer 0.

    python adadecode.py --prompt "Write a function that reverses a string." --method ada
    python adadecode.py --prompts prompts.jsonl --method greedy --json
"""
import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from checkpoint import Tokenizer, check_model_name, eos_ids, in_huge_pages, load_model, prepare_default_model
from cli import check_device, default_device, read_prompts
from exits import CONTEXT, Threshold, acts, context_guess, from_spec, in_context, lookup
from model import InputError, argmax
from quantize import (int4_unsupported, int8_unsupported, pack_float32, pack_unsupported, precision,
                      quantize_int4, quantize_int8)

# the shipped heads, found next to this file whatever the working directory
DEFAULT_HEADS = str(Path(__file__).resolve().parent / "heads" / "smollm2-135m-instruct.safetensors")
DTYPES = ["float32", "int8", "int4", "bfloat16", "float64"]


@dataclass
class Stats:
    n_layers: int = 0
    early_by_layer: Counter = field(default_factory=Counter)   # tokens emitted early, per head layer
    accepted: int = 0              # early tokens confirmed by the full model
    rejected: int = 0              # early tokens the full model disagreed with (= rollbacks)
    discarded: int = 0             # early tokens dropped because an earlier one was rejected
    rollbacks: int = 0
    layer_calls: int = 0           # one layer run on a batch of rows
    rows_hist: Counter = field(default_factory=Counter)        # rows in a layer call -> how many calls
    layer_rows: int = 0            # layer-row computations (greedy: L per generated token)
    sequential_layers: int = 0     # layers on the critical path: each step's climb, to its exit or the top
    head_checks: int = 0
    host_syncs: int = 0            # values brought to the host (on a GPU each one waits for the queue):
                                   # one per argmax, one per head check (a Guess in one transfer)
    steps: int = 0                 # climbs: each new token's (or a flush's) pass up the stack
    verifications: int = 0         # times rows reached the top and were checked
    verify_rows: Counter = field(default_factory=Counter)      # rows in a verification -> how many (its LM head call)
    exit_layer_sum: int = 0        # summed over verified tokens, L for tokens from the full model
    trace: list | None = None      # if a list: ("run", step, start, stop, first_pos, rows), ("exit", step, layer),
                                   # ("rollback", step, pos) events, for bench.py's schedule picture

    def count_call(self, rows, n_layers):
        self.layer_calls += n_layers
        self.rows_hist[rows] += n_layers
        self.layer_rows += rows * n_layers
        self.sequential_layers += n_layers

    def summary(self, n_tokens):
        """A JSON-ready dict with the derived figures."""
        greedy_rows = max(n_tokens - 1, 0) * self.n_layers   # greedy runs every token after the first through L layers
        d = asdict(self)
        d.pop("trace")
        d.update(early_by_layer=dict(sorted(self.early_by_layer.items())), rows_hist=dict(sorted(self.rows_hist.items())),
                 verify_rows=dict(sorted(self.verify_rows.items())),
                 early=sum(self.early_by_layer.values()),
                 mean_rows_per_call=self.layer_rows / max(self.layer_calls, 1),
                 greedy_layer_rows=greedy_rows, wasted_layer_rows=self.layer_rows - greedy_rows,
                 mean_exit_layer=self.exit_layer_sum / max(n_tokens, 1),
                 accepted_per_verification=self.accepted / max(self.verifications, 1),
                 rejection_rate=self.rejected / max(self.accepted + self.rejected, 1),
                 ideal_speedup=greedy_rows / max(self.sequential_layers, 1))
        return d


@dataclass
class GenerationResult:
    prompt_tokens: list
    tokens: list
    seconds: float                 # decode wall time, prefill excluded
    prefill_seconds: float
    stats: Stats
    cache: object = None           # the KV cache as generation left it (tests inspect it)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def token_tensor(tokens, device):
    """(1, T) token ids on `device`. On a GPU the copy leaves from pinned memory without
    blocking the host, which goes on queueing the layers behind it."""
    t = torch.tensor([tokens])
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def token_budget(model, prompt, max_new_tokens):
    """How many tokens may be generated: max_new_tokens, or fewer where the context ends."""
    if len(prompt) == 0:
        raise InputError("the prompt is empty")
    room = model.args.max_seq_len - len(prompt)
    if room <= 0:
        raise InputError(f"the prompt has {len(prompt)} tokens; the model's context is {model.args.max_seq_len}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    return min(max_new_tokens, room)


def prompt_token_ids(model, tok, prompts, max_new_tokens, raw=False):
    """Every prompt's token ids, each checked against the model's context before any of
    them runs: a prompt that does not fit stops a long run at its start, not halfway."""
    ids = []
    for n, p in enumerate(prompts, 1):
        try:
            x = tok.prompt_ids(p["prompt"], raw=raw)
            token_budget(model, x, max_new_tokens)
        except InputError as e:
            raise InputError(f"prompt {n} of {len(prompts)}: {e}" if len(prompts) > 1 else str(e)) from None
        ids.append(x)
    return ids


def prefill(model, cache, prompt):
    """Run the whole prompt through every layer; return the first generated token."""
    x = torch.tensor([prompt], device=model.device)
    h = model.run_layers(model.embed(x), 0, cache)
    return int(argmax(model.logits(h[:, -1])))         # only the last position's logits are needed


@torch.inference_mode()
def generate_greedy(model, prompt, max_new_tokens, eos=(), on_token=None):
    """Plain greedy decoding: every token climbs all L layers before the next can start."""
    device, L = model.device, model.args.n_layers
    budget = token_budget(model, prompt, max_new_tokens)
    cache = model.new_cache(len(prompt) + budget)
    stats = Stats(n_layers=L)
    t0 = time.perf_counter()
    out = [prefill(model, cache, prompt)]
    stats.host_syncs += 1
    sync(device)
    t1 = time.perf_counter()
    nxt = torch.tensor([out], device=device)          # (1, 1): the newest token, kept on the device
    while True:
        if on_token:
            on_token(out[-1:])
        stats.exit_layer_sum += L
        if out[-1] in eos or len(out) == budget:
            break
        h = model.run_layers(model.embed(nxt), len(prompt) + len(out) - 1, cache)
        stats.count_call(1, L)
        nxt = argmax(model.logits(h[:, -1:]))         # the next call's input, without a host round trip
        out.append(int(nxt))                          # the one host sync per token
        stats.host_syncs += 1
    sync(device)
    return GenerationResult(prompt, out, time.perf_counter() - t1, t1 - t0, stats, cache)


@dataclass
class Deferred:
    frontier: int          # layers 0..frontier-1 have run on these rows
    h: torch.Tensor        # (1, n, dim) hidden states of consecutive positions


def default_max_pending(model):
    """How many early tokens may wait unverified when nothing says otherwise. A decoding
    call then has at most max_pending + 1 rows, and a quantised model's kernel computes a
    fixed number of rows per pass, so the default keeps every call within one pass: 3 in
    int4 (aten's kernel: 4 rows), 7 in int8 where int8mm.c has AMX or AVX-512 VNNI (8 rows).
    Its AVX2 and plain C paths have no such pass: each row costs its own multiplies (on an AMD
    EPYC a 4-row layer call costs 1.2-1.5x a one-row call, and the simulator puts 3 ahead of
    4 and 5 by 2-3% with each of six cost models), so 3 there. float32's `linear` has no
    pass to fill; 5 there. Each was then checked with the simulator on held-out prompts and
    measured against the alternatives (README, "How many early tokens may wait")."""
    kind = precision(model)
    if kind == "int8":
        from int8mm import kernel
        return 7 if kernel()[1] in ("amx", "avx512-vnni") else 3
    return 3 if kind == "int4" else 5


@torch.inference_mode()
def generate_ada(model, heads, prompt, max_new_tokens, eos=(), threshold=0.75, max_pending=None, on_token=None,
                 trace=False, policy=None):
    """AdaDecode: greedy decoding's tokens, with confident tokens emitted early. The exit
    policy (exits.py) decides at each head; without one, top-1 probability >= threshold.
    max_pending None: default_max_pending(model)."""
    policy = policy or Threshold(threshold)
    max_pending = default_max_pending(model) if max_pending is None else max_pending
    if max_pending < 0:
        raise InputError(f"max_pending must be at least 0, got {max_pending}")
    policy.reset()
    device, L = model.device, model.args.n_layers
    budget = token_budget(model, prompt, max_new_tokens)
    cache = model.new_cache(len(prompt) + budget)
    stats = Stats(n_layers=L, trace=[] if trace else None)
    exit_layers = [CONTEXT] + [l for l in heads.layers if l < L]   # at layer L the final head itself decides;
                                                      # at 0 the context does, if the policy names it
    stops = [l for l in exit_layers if acts(policy, l)]   # the others are run through without a stop
    t0 = time.perf_counter()
    out = [prefill(model, cache, prompt)]             # generated tokens, the last ones maybe unverified
    stats.host_syncs += 1
    sync(device)
    t1 = time.perf_counter()
    exit_layer = [L]                                  # the layer each token of `out` was decided at
    deferred = []                                     # deepest frontier first; each block's rows follow the previous
    verified = 0
    while True:
        if on_token and len(out) > verified and not deferred:
            on_token(out[verified:])                  # only verified tokens are ever shown
        if not deferred:
            stats.exit_layer_sum += sum(exit_layer[verified:])
            verified = len(out)
        # A finished sequence (EOS or the budget) still has its early tokens verified: the
        # deferred rows are flushed up the stack without a new row.
        finished = out[-1] in eos or len(out) == budget
        if finished and not deferred:
            break
        pos = len(prompt) + len(out) - 1              # position of the newest token
        stats.steps += 1
        if finished:
            blk = deferred.pop()
            h, layer = blk.h, blk.frontier
        else:
            h, layer = model.embed(token_tensor(out[-1:], device)), 0   # a token the host already knows
        last = pos - 1 if finished else pos           # position of the newest row (an exit token has none yet)
        can_exit = not finished and pos - cache.lengths[L - 1] < max_pending
        rehearsed = []                                # would-be exits the policy only scores: (layer, token);
                                                      # dropped unheard if a later head exits for real
        found = None                                  # what the context says comes next (at the first check)
        while layer < L:
            # deferred rows join the batch at exactly the layer they need next
            if deferred and deferred[-1].frontier == layer:
                h = torch.cat([deferred.pop().h, h], dim=1)
            if layer in exit_layers and can_exit and policy.active(layer):
                found = found or lookup(list(prompt) + out)
                if layer == CONTEXT:                        # no layer has run: the context guesses, free
                    guess = context_guess(found)
                else:
                    guess = in_context(heads.check(layer, h[0, -1]), found)   # only the newest row decides
                    stats.head_checks += 1
                    stats.host_syncs += 1
                if guess is not None and policy.exit(layer, guess):
                    if policy.dry(layer):                   # a switched-off head's re-probe: scored, not taken
                        rehearsed.append((layer, guess.token))
                    else:                                   # exit: emit now, park every row here
                        deferred.append(Deferred(layer, h))
                        out.append(guess.token)
                        exit_layer.append(layer)
                        stats.early_by_layer[layer] += 1
                        if trace:
                            stats.trace.append(("exit", stats.steps, layer))
                        break
            # run up to the next place where something can happen: a head or a join
            stop = min([L] + [l for l in stops if l > layer and can_exit] + [b.frontier for b in deferred[-1:]])
            if trace:
                stats.trace.append(("run", stats.steps, layer, stop, cache.lengths[layer] - len(prompt), h.shape[1]))
            h = model.run_layers(h, last - h.shape[1] + 1, cache, layer, stop)   # the cache checks the position
            stats.count_call(h.shape[1], stop - layer)
            layer = stop
        else:
            n = len(out)
            out, exit_layer = verify(model, cache, h, len(prompt), out, exit_layer, stats, policy)
            if len(out) == n + 1:                     # the newest row's own token, after a verified context
                for l, token in rehearsed:
                    policy.observe(l, token == out[-1])
    sync(device)
    return GenerationResult(prompt, out, time.perf_counter() - t1, t1 - t0, stats, cache)


def verify(model, cache, h, n_prompt, out, exit_layer, stats, policy):
    """Rows h (1, T, dim) reached the top. Row r predicts the token after it: check every
    early token against it; at the first mismatch keep the model's token, drop the rest,
    and cut every layer's cache back to just after that row. The policy hears each verdict."""
    L = model.args.n_layers
    first = cache.lengths[L - 1] - h.shape[1]                 # position of the first row
    preds = argmax(model.logits(h)[0]).tolist()               # (T,)
    stats.verifications += 1
    stats.verify_rows[h.shape[1]] += 1
    stats.host_syncs += 1
    for r, pred in enumerate(preds):
        i = first + r + 1 - n_prompt                          # index in `out` of the token row r predicts
        if i == len(out):                                     # beyond the newest token: a new, verified token
            return out + [pred], exit_layer + [L]
        policy.observe(exit_layer[i], out[i] == pred)
        if out[i] == pred:
            stats.accepted += 1
            continue
        stats.rejected += 1
        stats.rollbacks += 1
        stats.discarded += len(out) - i - 1
        if stats.trace is not None:
            stats.trace.append(("rollback", stats.steps, i))
        cache.truncate(first + r + 1)
        return out[:i] + [pred], exit_layer[:i] + [L]
    return out, exit_layer


def generate_selfspec(model, heads, prompt, max_new_tokens, eos=(), draft_layer=None, k=4, on_token=None):
    """LayerSkip-style self-speculative decoding, in the same engine: draft k tokens with
    the first E layers and the head after E, then verify them in one batched pass through
    layers E+1..L that reuses the draft's KV entries. That is exactly AdaDecode with one
    head at E, threshold 0 (always exit) and at most k unverified tokens."""
    E = draft_layer or heads.layers[len(heads.layers) // 2]
    if E not in heads.layers:
        raise InputError(f"no exit head at draft layer {E}; heads are at {heads.layers}")
    if E >= model.args.n_layers:
        raise InputError(f"the draft layer must be below the last layer ({model.args.n_layers}); a head at "
                         f"layer {E} would never draft")
    return generate_ada(model, _OneHead(heads, E), prompt, max_new_tokens, eos, threshold=0.0, max_pending=k,
                        on_token=on_token)


class _OneHead:
    def __init__(self, heads, layer):
        self.heads, self.layers = heads, [layer]

    def check(self, layer, h):
        return self.heads.check(layer, h)


# --- command line ----------------------------------------------------------------

def setup(model_dir, heads_path, device, dtype=None):
    """Load model, tokenizer and (when a path is given) heads; the default model is prepared
    on first use. dtype None, on the CPU where the model allows it: int8 (about 2.5 times
    float32's speed, AdaDecode bit for bit its greedy, and since fused.c faster than int4 for
    both: README, 'int8 and int4 on the CPU'). Otherwise float32, packed for oneDNN on a CPU
    where that is faster (quantize.pack_float32).
    On the CPU the weights end in huge pages (checkpoint.in_huge_pages), moved once, after any conversion."""
    check_device(device)
    folder = model_dir or prepare_default_model()
    model = load_model(folder, dtype=dtype or torch.float32, device=device, pack="faster" if dtype is not None else False,
                       huge_pages=dtype is not None)
    if dtype is None:
        if not int8_unsupported(model):
            quantize_int8(model)
        elif not pack_unsupported(model):
            pack_float32(model)
        in_huge_pages(model)
    tok = Tokenizer(folder)
    heads = None
    if heads_path:
        from heads import ExitHeads
        heads = ExitHeads.load(heads_path, model)
    return model, tok, heads


def exit_policy(heads, threshold=None):
    """The policy AdaDecode runs with: top-1 probability >= threshold when one is given (the
    paper's rule), else the policy tuned for these heads (stored in the heads file by
    `simulate.py --fit`), else the paper's default threshold 0.75."""
    if threshold is not None:
        return Threshold(threshold)
    spec = getattr(heads, "meta", {}).get("policy")
    return from_spec(spec, heads.n_layers) if spec else Threshold(0.75)


def run(method, model, heads, prompt_ids, max_new_tokens, eos, threshold=None, max_pending=None, on_token=None):
    if method == "greedy":
        return generate_greedy(model, prompt_ids, max_new_tokens, eos, on_token)
    if method == "ada":
        return generate_ada(model, heads, prompt_ids, max_new_tokens, eos, max_pending=max_pending,
                            on_token=on_token, policy=exit_policy(heads, threshold))
    if method == "selfspec":
        return generate_selfspec(model, heads, prompt_ids, max_new_tokens, eos, on_token=on_token)
    raise InputError(f"unknown method {method!r}")


class Streamer:
    """Prints verified tokens' text as it arrives, and in the end exactly the text the
    non-streamed run prints: the text of all tokens so far is decoded each time and only
    its new end is printed, held back while it ends in U+FFFD (a character whose bytes
    are split across tokens, not all generated yet)."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], ""

    def __call__(self, new):
        self.ids.extend(new)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            self._print(text)

    def close(self):
        text = self.tok.decode(self.ids)
        self._print(text if text.startswith(self.shown) else self.shown + text[len(self.shown):])
        print(flush=True)

    def _print(self, text):
        print(text[len(self.shown):], end="", flush=True)
        self.shown = text


def main(argv=None):
    ap = argparse.ArgumentParser(description="Greedy, AdaDecode and self-speculative decoding of a Llama or Qwen2 model.")
    ap.add_argument("--model", help="a Llama-family or Qwen2 checkpoint folder, or a hub id (org/name) "
                    "(default: SmolLM2-135M-Instruct, prepared offline)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="JSON Lines file: {\"prompt\": ...} or {\"turns\": [...]} per line")
    ap.add_argument("--raw", action="store_true", help="feed the text as is, without the chat template")
    ap.add_argument("--method", choices=["greedy", "ada", "selfspec"], default="greedy")
    ap.add_argument("--heads", help="exit heads file (default for the default model: heads/smollm2-135m-instruct.safetensors)")
    ap.add_argument("--threshold", type=float, help="exit when the head's top-1 probability is at least this "
                    "(default: the exit policy tuned for the heads, stored in the heads file)")
    ap.add_argument("--max-pending", type=int, help="at most this many unverified early tokens (default: 3 in int4 "
                    "and 7 in int8, one pass of their kernels' 4 and 8 rows (3 where int8's kernel has only AVX2); "
                    "5 in float32)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--device", default=default_device(), help="cuda when available, else cpu")
    ap.add_argument("--dtype", choices=DTYPES,
                    help="default on the CPU: int8 (weight-only quantised linear layers; AdaDecode bit for bit "
                         "their greedy); float32 on a GPU; float32 gives the checkpoint's own numbers, int4 the "
                         "default model's own 4-bit weights (README, 'int8 and int4')")
    ap.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    ap.add_argument("--stream", action="store_true", help="print verified text as it is confirmed")
    a = ap.parse_args(argv)
    try:
        if a.threshold is not None and not 0.0 <= a.threshold <= 1.0:
            raise InputError(f"--threshold must be in [0, 1], got {a.threshold}")
        if a.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {a.max_new_tokens}")
        if a.max_pending is not None and a.max_pending < 0:
            raise InputError(f"--max-pending must be at least 0, got {a.max_pending}")
        if a.prompt is not None and not a.prompt:
            raise InputError("--prompt is empty")
        check_device(a.device)
        dtype = getattr(torch, a.dtype) if a.dtype else None
        if a.model:
            check_model_name(a.model)
        heads_path = a.heads or (DEFAULT_HEADS if a.method != "greedy" and not a.model else None)
        if a.method != "greedy" and not heads_path:
            raise InputError(f"--method {a.method} needs --heads for a model other than the default")
        prompts = [{"prompt": a.prompt}] if a.prompt is not None else read_prompts(a.prompts)
        model, tok, heads = setup(a.model, heads_path, a.device, dtype)
        eos = eos_ids(model, tok)
        for ids in prompt_token_ids(model, tok, prompts, a.max_new_tokens, a.raw):
            room = model.args.max_seq_len - len(ids)
            if 0 < room < a.max_new_tokens:
                print(f"note: the prompt has {len(ids)} tokens and the model's context {model.args.max_seq_len}: "
                      f"at most {room} new tokens, not {a.max_new_tokens}", file=sys.stderr)
            stream = Streamer(tok) if a.stream and not a.json else None
            r = run(a.method, model, heads, ids, a.max_new_tokens, eos, a.threshold, a.max_pending, on_token=stream)
            if a.json:
                print(json.dumps({"prompt_tokens": r.prompt_tokens, "tokens": r.tokens, "text": tok.decode(r.tokens),
                                  "seconds": r.seconds, "tokens_per_second": (len(r.tokens) - 1) / r.seconds if r.seconds and len(r.tokens) > 1 else None,
                                  "prefill_seconds": r.prefill_seconds, "method": a.method, "dtype": precision(model),
                                  "stats": r.stats.summary(len(r.tokens))}))
            elif stream:
                stream.close()
            else:
                print(tok.decode(r.tokens))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from cli import run_cli
    sys.exit(run_cli(main))
