"""
What a benchmark run reports, from the rows bench.py timed: per method the throughput,
the speedups over greedy in the same dtype (aggregate, median, and without the prompts
whose output ends in a repetition loop), the exit statistics and parity (summarise);
the terminal table; each dtype's memory-bandwidth floor (floor_report); results.csv;
and the plots (threshold sweep, exit layers, the schedule of one prompt, the row cost).
And the machine they were taken on: its name, peak memory, read bandwidth. Nothing here
runs the model.
"""
import csv
import json
import os
import platform
import re
import resource
import statistics
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from adadecode import sync
from checkpoint import huge_page_bytes


LAUNCH_SECONDS = 5e-6      # a typical CUDA kernel launch from eager PyTorch, for the launch-bound estimate


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
    else:                     # what computes a layer's small steps here (fused.py)
        import fused
        info["small_steps"] = "fused.c" if fused.enabled and fused.library() else "PyTorch"
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


def read_bandwidths(device, gib=1.0, repeats=5):
    """Memory read bandwidth (GB/s) as two readers measure it, each the median time to read a
    large buffer once, interleaved: torch's sum, and on the CPU, where fused.c runs, fused.c's
    linear layer (the buffer as a (N, 1024) float32 matrix times one row), the reader float32
    decoding uses. On this project's Intel Xeon the second reads 10-15% faster (README, "float32's
    matrices in C"), so a floor measured with sum alone would sit too low."""
    import fused
    x = torch.ones(int(gib * 2**30 / 4) // 1024, 1024, dtype=torch.float32, device=device)
    readers = {"torch.sum": x.sum}
    if fused.runs(x):
        one = torch.ones(1, 1024)
        readers["fused.c linear"] = lambda: fused.linear(one, x)
    times = {k: [] for k in readers}
    for rep in range(repeats + 1):
        for k, read in readers.items():
            sync(device)
            t = time.perf_counter()
            read()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: x.numel() * 4 / statistics.median(v[1:]) / 1e9 for k, v in times.items()}


def weight_memory(model):
    """Bytes the weights occupy (parameters and buffers, a shared matrix once)."""
    return tensor_bytes(model)


def tensor_bytes(*parts):
    """Bytes of the tensors of these modules and tensors, a shared one once."""
    ts = {id(t): t for p in parts for t in ([p] if isinstance(p, torch.Tensor) else [*p.parameters(), *p.buffers()])}
    return sum(t.numel() * t.element_size() for t in ts.values())


def method_bytes_per_token(model, heads, s):
    """Bytes of weights a method reads per decoded token, from its summary's counts: every
    one-layer call reads its layer once, whatever its rows; every verification the LM head;
    every exit check its head. Greedy's are weight_bytes_per_token's; AdaDecode reads fewer
    layers but the LM head only where rows reach the top."""
    layer = tensor_bytes(*model.layers) / model.args.n_layers
    total = s["layer_calls_per_token"] * layer + s["verifications_per_token"] * tensor_bytes(model.output)
    return total + (s["head_checks_per_token"] * tensor_bytes(*heads.check_weights()) if heads is not None else 0)


def weight_bytes_per_token(model):
    """Bytes of weights read to decode one token: every matrix once (int8 weights and their
    scales included), except the embedding, of which the lookup reads one row, unless the
    LM head multiplies by that very matrix (a packed or int8 LM head is its own copy)."""
    emb = model.tok_embeddings.weight
    total = weight_memory(model)
    if not (isinstance(model.output, torch.nn.Linear) and model.output.weight is emb):
        total -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    return total


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
            # per decoded token (the prefill's first token not counted): what the weights read depends on
            **{f"{k}_per_token": s[k] / max(toks - len(rs), 1) for k in ("layer_calls", "verifications", "head_checks")},
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


def working_set_read(device, model, repeats=5):
    """The read bandwidth (GB/s, the faster reader) over a buffer the size of the weights a token
    reads: where the CPU's last-level cache can hold that much (the int8 model's 136 MB in this
    project's Intel Xeon's 300 MB L3, when the VM's neighbours leave it room), it reads faster
    than read_bandwidths' 1 GiB, and greedy can pass the floor measured with that. None from
    1 GiB on: no cache holds that much, and a large model's second copy is not allocated."""
    wbytes = weight_bytes_per_token(model)
    return max(read_bandwidths(device, gib=max(wbytes, 2**20) / 2**30, repeats=repeats).values()) if wbytes < 2**30 else None


def floor_report(dt, model, greedy, bw, device, heads=None, others=None, ws=None):
    """dtype dt's memory-bandwidth floor (weights read per token / measured read bandwidth
    bw, GB/s) and greedy's share of it, printed and returned; with the float32 kernel chosen
    at load, and on a GPU the launch-bound estimate from greedy's operator calls. `ws`: the
    read over a buffer the weights' size (working_set_read), and greedy's share by it. `others`:
    {label: summary} of the dtype's other methods, each with its own floor (the weights it
    reads per token, method_bytes_per_token) and its share of it: what a method loses beside
    its floor is time that is not reading weights (its extra rows' arithmetic, checks, Python),
    which weighs more the cheaper the dtype's token."""
    wbytes = weight_bytes_per_token(model)
    g = greedy["tokens_per_second"]
    huge = huge_page_bytes(model) if torch.device(device).type == "cpu" else None
    floor = {"weight_bytes_per_token": wbytes, "weight_memory_bytes": weight_memory(model),
             "floor_tokens_per_second": bw * 1e9 / wbytes, "greedy_fraction_of_floor": g / (bw * 1e9 / wbytes),
             "huge_page_bytes": huge}
    print(f"\n{dt}: memory-bandwidth floor: {wbytes / 1e6:.0f} MB of weights per token / {bw:.1f} GB/s measured "
          f"read bandwidth = {bw * 1e9 / wbytes:.1f} tok/s; greedy reaches {g:.1f} tok/s "
          f"({g / (bw * 1e9 / wbytes):.0%} of the floor); weights in memory {floor['weight_memory_bytes'] / 2**20:.0f} MiB"
          + ("" if huge is None else f", {huge / 2**20:.0f} MiB of them in huge pages"))
    if ws is not None:
        floor["working_set_read_gb_s"] = ws
        print(f"{dt}: a buffer of those {wbytes / 1e6:.0f} MB reads at {ws:.1f} GB/s (the 1 GiB probe's {bw:.1f}): "
              f"{'the caches hold much of it; ' if ws > 1.25 * bw else ''}by that floor greedy reaches "
              f"{g / (ws * 1e9 / wbytes):.0%}")
    for label, s in (others or {}).items():
        if s.get("layer_calls_per_token") and s["tokens_per_second"]:
            mbytes = method_bytes_per_token(model, heads, s)
            share = s["tokens_per_second"] / (bw * 1e9 / mbytes)
            floor.setdefault("methods", {})[label] = {"weight_bytes_per_token": mbytes, "floor_tokens_per_second":
                                                      bw * 1e9 / mbytes, "fraction_of_floor": share}
            print(f"{dt}: {label} reads {mbytes / 1e6:.0f} MB of weights per token ({mbytes / wbytes:.0%} of greedy's): "
                  f"its floor {bw * 1e9 / mbytes:.1f} tok/s; it reaches {s['tokens_per_second']:.1f} ({share:.0%} of its floor)")
    packing = getattr(model, "packing", None)
    if packing:                  # float32 on the CPU: which kernel load_model's timing chose
        floor["packing"] = packing
        dense = packing.get("dense", "F.linear")
        print(f"{dt}: {'oneDNN packed kernel' if packing['packed'] else dense} chosen at load: every "
              f"matrix for 1 and 3 rows took {packing['packed_seconds'] * 1e3:.1f} ms packed, "
              f"{packing['dense_seconds'] * 1e3:.1f} ms with {dense}")
    calls = greedy.get("operator_calls_per_token")
    if calls and torch.device(device).type == "cuda":   # at batch 1 a small model is launch-bound
        floor["launch_bound_tokens_per_second"] = 1 / (calls * LAUNCH_SECONDS)
        per_call = 1 / (g * calls)                        # measured: the host's whole cost per operator
        floor["seconds_per_operator_call"] = per_call
        print(f"{dt}: launch-bound estimate: {calls:.0f} operator calls per token x "
              f"{LAUNCH_SECONDS * 1e6:.0f} us per kernel launch = {1 / (calls * LAUNCH_SECONDS):.0f} tok/s; "
              f"measured: {per_call * 1e6:.1f} us per operator call (Python, dispatch and launch on the host)")
    return floor


@contextmanager
def replacing(path):
    """A temporary name beside `path` to write to, renamed over `path` once the write is
    done: an interrupted run leaves the previous file (or none), never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")   # the suffix tells matplotlib the format
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj):
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def save(fig, path, dpi):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


def write_csv(path, rows):
    """results.csv: one row per prompt and method."""
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
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
        save(fig, out / "threshold_sweep.png", 110)
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
    save(fig, out / "exit_layers.png", 110)
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
    save(fig, path, 120)


def row_cost_plot(path, rows, mach):
    """rows {n: seconds per layer call of n rows}, relative to one row, beside proportional cost."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(list(rows), [c / rows[1] for c in rows.values()], "o-", label=f"{mach['dtype']}")
    ax.plot(list(rows), list(rows), "k:", lw=0.8, label="proportional to rows")
    ax.set_xlabel("rows in one layer call"), ax.set_ylabel("time relative to one row")
    ax.set_title(f"Row cost: {mach.get('gpu', mach['cpu'])}", fontsize=8), ax.legend(fontsize=8)
    save(fig, path, 110)
