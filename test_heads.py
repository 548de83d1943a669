"""Exit heads: logit lens at identity, KL training works, save/load, refusals.

    pytest -q test_heads.py
"""
import json

import pytest
import torch

from adadecode import DEFAULT_HEADS, exit_policy, main
from conftest import assert_close, random_llama
from exits import Guard
from heads import ExitHeads
from model import InputError
from train_heads import collect_features, evaluate, kl_loss


def test_identity_head_is_the_logit_lens():
    model = random_llama(1)
    h = torch.randn(5, model.args.dim, dtype=torch.float64)
    heads = ExitHeads(model, [1, 3])
    assert_close(heads.logits(3, h), model.logits(h), atol=1e-12, rtol=1e-12, what="identity head vs lm_head(norm(h))")
    g = heads.check(1, h[0])
    p = torch.softmax(model.logits(h[0]), -1)
    top = p.topk(2).values
    assert g.token == int(p.argmax()) and g.p1 == pytest.approx(float(top[0])) and g.p2 == pytest.approx(float(top[1]))
    assert g.entropy == pytest.approx(float(-(p * p.log()).sum()))
    assert heads.check_rows(1, h[:1]) == [g]             # batched and single-row checks agree


def test_a_zero_residual_block_is_still_the_logit_lens_and_a_trained_one_changes_the_head():
    model = random_llama(1)
    h = torch.randn(5, model.args.dim, dtype=torch.float64)
    heads = ExitHeads(model, [1, 3], residual=True)
    assert_close(heads.logits(3, h), model.logits(h), atol=1e-12, rtol=1e-12, what="zero residual block vs the lens")
    with torch.no_grad():
        heads.W.normal_()
    u = h @ heads.T[1].T
    assert_close(heads.logits(3, h), model.logits(u + torch.nn.functional.silu(u @ heads.W[1].T)), atol=1e-12,
                 rtol=1e-12, what="u + silu(W u)")


def test_training_lowers_the_kl():
    model = random_llama(2, n_layers=4)
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(0, 97, (6,), generator=g).tolist(), torch.randint(0, 97, (10,), generator=g).tolist())
            for _ in range(6)]
    for residual in (None, True):                          # the transform alone, and with residual blocks
        heads = ExitHeads(model, [1, 2], residual=residual)
        feats, final = collect_features(model, heads.layers, seqs)
        assert final.shape == (6 * 10, model.args.dim)      # last prompt position + all response positions but the last
        idx = torch.arange(len(final))
        before = kl_loss(heads, feats, final, idx).item()
        heads.requires_grad_(True)
        opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
        for _ in range(20):
            loss = kl_loss(heads, feats, final, idx)
            opt.zero_grad(), loss.backward(), opt.step()
        after = kl_loss(heads, feats, final, idx).item()
        assert after < 0.7 * before, (residual, before, after)
        assert residual is None or heads.W.abs().max() > 0  # the block learned something
        table, _ = evaluate(heads.requires_grad_(False), feats, final)
        assert set(table) == {1, 2} and all(0 <= r["agreement"] <= 1 for r in table.values())


def test_features_for_a_head_after_the_last_layer_are_the_final_hidden_states():
    model = random_llama(3, n_layers=2)
    seqs = [([5, 6, 7], [8, 9, 10, 11])]
    feats, final = collect_features(model, [1, 2], seqs)    # the default layers of a 2-layer model once included 2
    assert set(feats) == {1, 2} and final.shape == (4, model.args.dim)
    assert torch.equal(feats[2], final) and not torch.equal(feats[1], final)


def test_save_load_round_trip_and_refusals(tmp_path):
    model = random_llama(3)
    heads = ExitHeads(model, [2, 4], torch.randn(2, model.args.dim, model.args.dim, dtype=torch.float64),
                      torch.randn(2, model.args.dim, model.args.dim, dtype=torch.float64))
    heads.set_shortlist([5, 7, 11])
    heads.save(tmp_path / "h.safetensors", evaluation={"x": 1})
    back = ExitHeads.load(tmp_path / "h.safetensors", model)
    assert back.layers == [2, 4] and back.meta["evaluation"] == {"x": 1}
    assert_close(back.T, heads.T.float().double(), atol=1e-6, what="transforms")   # stored in float32
    assert_close(back.W, heads.W.float().double(), atol=1e-6, what="residual blocks")
    ExitHeads(model, [2, 4]).save(tmp_path / "plain.safetensors")
    assert ExitHeads.load(tmp_path / "plain.safetensors", model).W is None      # files without blocks load as before
    assert back.shortlist.tolist() == [5, 7, 11] and back.check(2, torch.randn(model.args.dim, dtype=torch.float64)).token in (5, 7, 11)
    with pytest.raises(InputError, match="another model"):
        ExitHeads.load(tmp_path / "h.safetensors", random_llama(4))
    with pytest.raises(InputError, match="no such heads file"):
        ExitHeads.load(tmp_path / "missing.safetensors", model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a heads file"):
        ExitHeads.load(tmp_path / "junk.safetensors", model)


@pytest.mark.parametrize("layers", [[0], [9], [3, 3], [4, 2], [1.5]])
def test_bad_layer_indices_are_rejected(layers):
    with pytest.raises(InputError, match="layer"):
        ExitHeads(random_llama(0, n_layers=8), layers)


def test_shipped_heads_load_for_the_default_model_and_refuse_others(real, tmp_path, capsys):
    folder, model, tok, eos = real
    heads = ExitHeads.load(DEFAULT_HEADS, model)
    assert set(heads.layers) <= set(heads.meta["training"]["layers"]) and heads.shortlist is not None
    policy = exit_policy(heads)                      # the tuned policy the heads file carries
    assert isinstance(policy, Guard) and json.loads(json.dumps(policy.spec())) == heads.meta["policy"]
    assert {str(l) for l in heads.layers} <= set(heads.meta["operating_point"]) <= {str(l) for l in [0] + heads.layers}
    ev = heads.meta["evaluation"]["trained"]
    assert all(ev[str(l)]["agreement"] > ev_id["agreement"]
               for l, ev_id in zip(heads.layers, (heads.meta["evaluation"]["identity"][str(l)] for l in heads.layers)))
    # a tiny random checkpoint with the heads of the default model: a clear refusal, exit code 2
    from conftest import save_tiny_checkpoint, tiny_config
    save_tiny_checkpoint(tmp_path, tiny_config())
    import shutil
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    assert main(["--model", str(tmp_path), "--prompt", "hi", "--raw", "--method", "ada", "--heads", DEFAULT_HEADS]) == 2
    assert "another model" in capsys.readouterr().err


def test_the_shipped_heads_are_found_from_any_working_directory(real, tmp_path, monkeypatch, capsys):
    """`python /path/to/adadecode.py --method ada` run from another folder uses the shipped
    heads next to the script, not a heads/ folder under the working directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["--prompt", "Say hi.", "--method", "ada", "--dtype", "float32", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 3 and out["method"] == "ada"


def test_training_prompts_are_deterministic_and_never_benchmark_prompts():
    """The held-out split is the same in every process (no memory addresses in the prompts),
    and no training prompt is one that bench.py reports (HumanEval, prompts.jsonl) or that
    policies are tuned on (prompts-tune.jsonl)."""
    import subprocess
    import sys
    from bench import humaneval_prompts
    from train_data import MIXED_PER_DOMAIN, domain_prompts, stdlib_function_prompts, without_benchmark_prompts
    code = stdlib_function_prompts()
    assert not any(" at 0x" in p["prompt"] for p in code)
    probe = ("import hashlib, json; from train_data import stdlib_function_prompts, held_out_split; "
             "print(hashlib.sha256(json.dumps(held_out_split(stdlib_function_prompts(), 400)).encode()).hexdigest())")
    runs = {subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(runs) == 1, "the held-out split differs between processes"
    training = {p["prompt"] for p in code + domain_prompts(MIXED_PER_DOMAIN)}
    reported = {p["prompt"] for p in humaneval_prompts()}
    for f in ("prompts.jsonl", "prompts-tune.jsonl"):
        reported |= {json.loads(l)["prompt"] for l in open(f) if l.strip()}
    assert not training & reported
    assert {p["category"] for p in domain_prompts()} == {"math", "summarisation", "chat", "translation"}
    # nor a near copy of a benchmark prompt: a template that happens to write one is dropped
    assert without_benchmark_prompts(domain_prompts(MIXED_PER_DOMAIN)) == domain_prompts(MIXED_PER_DOMAIN)
    near = [{"prompt": "Solve for x: 3x + 7 = 22. Explain each step."}, {"prompt": "why is the sky blue?"},
            {"prompt": "Solve for x: 4x + 7 = 22."}]
    assert without_benchmark_prompts(near) == near[2:]


def test_a_prompt_file_near_a_reported_prompt_is_found():
    """train_heads.py --prompts warns about prompts that bench.py reports (HumanEval's and
    prompts.jsonl's), also when they come wrapped in other words."""
    from bench import humaneval_prompts
    from train_data import reported_prompts, without
    mine = [{"prompt": "Please finish this:\n" + humaneval_prompts()[3]["prompt"][-300:]},
            {"prompt": "Write a short haiku about autumn rain on a tin roof."},
            {"prompt": "First, " + json.loads(open("prompts.jsonl").readline())["prompt"]}]
    assert without(mine, reported_prompts()) == [mine[1]]
    # the request bench.py wraps HumanEval in is this project's own text: a code request
    # in the same words, about another function, is not near a reported prompt
    from train_data import CODE_REQUEST
    other = {"prompt": CODE_REQUEST.format(code='def clamp(x, lo, hi):\n    """Limit x to [lo, hi]."""\n')}
    assert without([other], reported_prompts()) == [other]
