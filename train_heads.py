"""
Train AdaDecode exit heads: KL(p_final || p_head) at every response position, with the
base model frozen and only each head's d x d transform trained (Wei et al. 2025).

Training text is what the heads will see at inference: the model's own greedy
responses to prompts of the target domain, generated once in batches and cached on
disk. The default domain is code: "complete this function" requests built from the
signatures and docstrings of pure-Python functions in the standard library (never
HumanEval, which bench.py reports). A held-out split is evaluated at the end: per head,
top-1 agreement with the final layer, and coverage / precision at thresholds 0.5, 0.75,
0.9, stored in the heads file; a calibration plot is written next to it. The prompts,
their split and the cached responses are train_data.py's.

    python train_heads.py                                   # the shipped heads, ~20 min on 2 CPU cores
    python train_heads.py --layers 6 12 18 --out my_heads.safetensors
    python train_heads.py --prompts my_prompts.jsonl --model path/to/hf/llama
"""
import argparse
import math
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from adadecode import DEFAULT_HEADS, prompt_token_ids
from checkpoint import Tokenizer, eos_ids, load_model, prepare_default_model, resolve_checkpoint
from cli import check_device, check_writable, default_device, read_prompts
from heads import ExitHeads
from model import InputError
from quantize import int4_unsupported, int8_unsupported, quantize_int4, quantize_int8
from train_data import (default_split, function_sources, generate_responses, held_out_split, reported_prompts,
                        response_cache, stdlib_function_prompts, without)


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
    from report import save
    save(fig, path, 110)


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
    ap.add_argument("--out", default=DEFAULT_HEADS,
                    help="where to write the heads (default: the shipped file, heads/smollm2-135m-instruct.safetensors)")
    a = ap.parse_args(argv)
    try:
        for flag, value, ok, rule in (("--n", a.n, a.n >= 4, "at least 4"), ("--epochs", a.epochs, a.epochs >= 0, "at least 0"),
                                      ("--batch", a.batch, a.batch >= 1, "at least 1"), ("--lr", a.lr, a.lr > 0, "above 0"),
                                      ("--shortlist", a.shortlist, a.shortlist >= 0, "at least 0 (0: the whole vocabulary)"),
                                      ("--heldout", a.heldout, 0 < a.heldout < 1, "between 0 and 1"),
                                      ("--ce", a.ce, a.ce >= 0, "at least 0"),
                                      ("--max-new-tokens", a.max_new_tokens, a.max_new_tokens >= 1, "at least 1")):
            if not ok:                     # (a NaN fails every rule)
                raise InputError(f"{flag} must be {rule}, got {value}")
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
