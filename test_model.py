"""The hand-written Llama against Hugging Face transformers, the KV cache, the loader's errors.

    pytest -q test_model.py
"""
import json
import re
import shutil

import pytest
import torch
from hypothesis import given, strategies as st

import fused
from adadecode import generate_greedy, main
from checkpoint import load_model, prepare_default_model
from cli import read_prompts
from conftest import assert_close, random_llama, save_tiny_checkpoint, tiny_config
from kvcache import KVCache
from model import CheckpointError, InputError, Linear

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CONFIGS = [  # (name, tiny_config kwargs): GQA ratios, rope variants, tied and untied heads
    ("mha-untied", dict(n_heads=4, n_kv_heads=4)),
    ("gqa2-tied", dict(n_heads=4, n_kv_heads=2, tie=True)),
    ("mqa-llama3-rope", dict(n_heads=6, n_kv_heads=1, dim=48, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    ("gqa3-linear-rope", dict(n_heads=6, n_kv_heads=2, dim=48, rope_scaling={"type": "linear", "factor": 2.0})),
    ("qwen2-gqa-untied", dict(arch="qwen2", n_heads=4, n_kv_heads=2, rope_theta=1e6)),
    ("qwen2-tied", dict(arch="qwen2", n_heads=6, n_kv_heads=2, dim=48, tie=True)),
]


@pytest.mark.parametrize("name,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_forward_matches_transformers(tmp_path, name, kw):
    cfg = tiny_config(**kw)
    hf = save_tiny_checkpoint(tmp_path, cfg, seed=1, scale=3.0).double().eval()
    ours = load_model(tmp_path, dtype=torch.float64)
    tokens = torch.randint(0, cfg["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours.logits(ours.run_layers(ours.embed(tokens), 0, ours.new_cache(40)))
    # transformers' RMSNorm computes in float32 even for a float64 model, hence ~1e-5 and not 1e-12
    assert_close(got, ref, atol=3e-4, rtol=3e-4, what="logits")
    with torch.no_grad():
        hf_tokens = hf.generate(tokens[:, :8], max_new_tokens=24, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, 8:].tolist()
    assert generate_greedy(ours, tokens[0, :8].tolist(), 24).tokens == hf_tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_incremental_forward_equals_full_recompute(arch):
    model = random_llama(3, n_heads=6, n_kv_heads=3, dim=48, arch=arch)
    tokens = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(1))
    full = model.logits(model.run_layers(model.embed(tokens), 0, model.new_cache(30)))
    cache = model.new_cache(30)
    steps = [model.logits(model.run_layers(model.embed(tokens[:, :10]), 0, cache))]
    for p in range(10, 30, 4):   # blocks of several rows, like deferred rows joining a call
        steps.append(model.logits(model.run_layers(model.embed(tokens[:, p:p + 4]), p, cache)))
    assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=1e-10, what="incremental vs full logits")


def test_attention_takes_any_memory_layout_the_kernel_returns(monkeypatch):
    """CUDA's attention kernels return (B, H, T, D) laid out as a transposed (B, T, H, D)
    buffer, where the CPU's is contiguous; the forward assumed contiguous and failed on a GPU
    (H100, 2026-11-25). The same numbers in CUDA's layout must give the same bits here."""
    model = random_llama(4, n_heads=6, n_kv_heads=2, dim=48)
    prompt = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(2))   # > ROW_BY_ROW: the masked path

    def decode():
        cache = model.new_cache(60)
        out = [model.logits(model.run_layers(model.embed(prompt), 0, cache))]
        for p, rows in ((40, 1), (41, 3), (44, 1)):             # one-row steps and a several-row call
            out.append(model.logits(model.run_layers(model.embed(prompt[:, :rows]), p, cache)))
        return torch.cat(out, 1), cache

    want, want_cache = decode()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa(*a, **k).transpose(1, 2).contiguous().transpose(1, 2))
    got, got_cache = decode()
    assert torch.equal(got, want) and torch.equal(got_cache.k, want_cache.k) and torch.equal(got_cache.v, want_cache.v)


@given(n1=st.integers(1, 20), cut=st.integers(0, 20), n2=st.integers(1, 12), seed=st.integers(0, 99))
def test_cache_truncate_then_extend_equals_fresh(n1, cut, n2, seed):
    cut = min(cut, n1)
    model = random_llama(seed % 5, n_layers=2)
    g = torch.Generator().manual_seed(seed)
    first, second = torch.randint(0, 97, (1, n1), generator=g), torch.randint(0, 97, (1, n2), generator=g)
    cache = model.new_cache(40)
    model.run_layers(model.embed(first), 0, cache)
    cache.truncate(cut)
    out = model.run_layers(model.embed(second), cut, cache)
    fresh = model.new_cache(40)
    ref = model.run_layers(model.embed(torch.cat([first[:, :cut], second], 1)), 0, fresh)[:, cut:]
    assert cache.lengths == fresh.lengths == [cut + n2] * 2
    assert_close(out, ref, atol=1e-10, rtol=1e-10, what="hidden states after truncate + extend")
    for l in range(2):
        assert_close(cache.view(l)[0], fresh.view(l)[0], atol=1e-10, rtol=1e-10, what=f"layer {l} keys")


def test_cache_per_layer_lengths_and_overflow():
    cache = KVCache(n_layers=3, n_kv_heads=1, head_dim=4, max_len=5)
    kv = torch.ones(1, 1, 3, 4)
    cache.append(0, 0, kv, kv)
    cache.append(1, 0, kv[:, :, :2], kv[:, :, :2])
    assert cache.lengths == [3, 2, 0]            # layers may lag each other
    cache.truncate(1, layer=0)
    assert cache.lengths == [1, 2, 0]
    with pytest.raises(ValueError, match="holds 2"):
        cache.append(1, 0, kv, kv)               # writing where entries already are
    with pytest.raises(ValueError, match="overflow"):
        cache.append(1, 2, torch.ones(1, 1, 4, 4), torch.ones(1, 1, 4, 4))
    cache.reset()
    assert cache.lengths == [0, 0, 0]


PROMPTS = ["Write a Python function that returns the n-th Fibonacci number.",
           "What is 17 times 23? Explain step by step.",
           "Summarise in one sentence: The city council met on Tuesday to discuss the new park. "
           "After two hours of debate they approved the budget, and work starts in spring.",
           "Hi! How are you today?"]


def test_default_model_greedy_matches_transformers(real):
    from transformers import LlamaForCausalLM
    folder, model, tok, eos = real
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for text in PROMPTS:
        ids = tok.prompt_ids(text)
        ours = generate_greedy(model, ids, 48, eos).tokens
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids):].tolist()
        assert ours == ref, text


def test_tokenizer_round_trip_and_chat_template(real):
    from transformers import PreTrainedTokenizerFast
    folder, model, tok, eos = real
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    for text in ["def f(x):\n    return x ** 2  # 12345", "Café naïve – 你好 🙂", "  leading spaces\tand tabs\n"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text)
        assert tok.decode(ids) == text
    rendered = tok.render_chat("Hello")
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    hf.chat_template = tok.chat_template
    assert rendered == hf.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                              add_generation_prompt=True)
    assert tok.prompt_ids("Hello")[:1] == [1] and eos == {2}


# --- error paths: a one-line message, never a traceback from inside torch ----------

def test_loader_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: no such folder"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file: not a folder"):
        load_model(tmp_path / "file")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="gpt2 checkpoints are not supported"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="names no model_type or architectures"):
        load_model(tmp_path)
    cfg = tiny_config()
    save_tiny_checkpoint(tmp_path / "a", cfg)
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 99}))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "a")
    for changes, message in (({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}, "q/k norms"),
                             ({"model_type": "qwen2_moe", "architectures": []}, "expert layers"),
                             ({**tiny_config(arch="qwen2"), "use_sliding_window": True, "sliding_window": 64},
                              "sliding")):
        (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, **changes}))
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file
    good = load_file(tmp_path / "a" / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"      # a part of the fused q/k/v matrix
    for value, message in ((float("nan"), "NaN or infinite"), (float("-inf"), "NaN or infinite"), (None, "int32")):
        bad = dict(good)
        bad[name] = bad[name].to(torch.int32) if value is None else bad[name].clone().index_fill_(1, torch.tensor([3]), value)
        save_file(bad, tmp_path / "a" / "model.safetensors")
        with pytest.raises(CheckpointError, match=f"{re.escape(name)} holds .*{message}"):
            load_model(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path / "a")


def test_prompt_errors(tmp_path):
    model = random_llama(0, max_pos=16)
    with pytest.raises(InputError, match="context"):
        generate_greedy(model, list(range(16)), 4)
    with pytest.raises(InputError, match="empty"):
        generate_greedy(model, [], 4)
    # the context limit stops generation cleanly
    assert len(generate_greedy(model, list(range(10)), 50).tokens) == 6
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no prompts"):
        read_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "p.jsonl").write_text('{"turns": ["first", "second"]}\n{"prompt": "x", "category": "c"}\n')
    assert [p["prompt"] for p in read_prompts(tmp_path / "p.jsonl")] == ["first", "x"]


def test_cli_errors_exit_nonzero(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["--prompt", "hi", "--method", "ada", "--threshold", "1.5"]) == 2
    assert "[0, 1]" in capsys.readouterr().err
    (tmp_path / "e.jsonl").write_text("")
    assert main(["--prompts", str(tmp_path / "e.jsonl")]) == 2
    assert "no prompts" in capsys.readouterr().err
    for device, msg in (("gpu", "not a device name"), ("mps", "only cpu and cuda"),
                        ("cuda" if not torch.cuda.is_available() else "cuda:99", "CUDA is not available|GPU")):
        assert main(["--prompt", "hi", "--device", device]) == 2
        assert re.search(msg, capsys.readouterr().err)


def test_cli_json_greedy(real, capsys):
    """The CLI decodes in float32 or int4 when asked, and by default in int8 on the CPU."""
    folder, model, tok, eos = real
    int8, int4 = load_model(folder, dtype=torch.int8), load_model(folder, dtype=torch.int4)
    for flags, m, want in ((["--dtype", "float32"], model, "float32"), (["--dtype", "int4"], int4, "int4"),
                           ([], int8, "int8")):
        assert main(["--prompt", "What is 2+2?", "--max-new-tokens", "8", "--json", "--device", "cpu", *flags]) == 0
        row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert row["dtype"] == want
        assert row["prompt_tokens"] == tok.prompt_ids("What is 2+2?")
        assert row["tokens"] == generate_greedy(m, row["prompt_tokens"], 8, eos).tokens
        assert row["tokens_per_second"] > 0 and row["text"] == tok.decode(row["tokens"])


# --- torch.compile: fair to every method -------------------------------------------

@pytest.mark.parametrize("quantized", [None, "int8", "int4"])
def test_compiled_blocks_do_not_recompile_after_a_warm_up(quantized):
    """--compile compiles the same graphs for greedy (one row) and AdaDecode (several):
    after one warm-up of each, decoding other prompts, lengths and row counts compiles
    nothing more (dynamo's error_on_recompile), and the output is the eager output."""
    import torch._dynamo
    from adadecode import generate_ada
    from exits import Threshold
    from heads import ExitHeads
    from quantize import quantize_int4, quantize_int8
    torch._dynamo.reset()
    kw = dict(dim=64, ffn=128, n_heads=4, n_kv_heads=2, n_layers=4, vocab=61) if quantized else dict(n_layers=4)
    eager = random_llama(5, dtype=torch.float32, **kw)
    model = random_llama(5, dtype=torch.float32, **kw)
    if quantized:
        quantize = quantize_int8 if quantized == "int8" else quantize_int4
        eager, model = quantize(eager), quantize(model)
    model.compile_blocks(backend="eager")          # dynamo's graphs and guards, without code generation
    heads, eager_heads = ExitHeads(model, [1, 2, 3]), ExitHeads(eager, [1, 2, 3])
    generate_greedy(model, [1, 2, 3], 6)
    generate_ada(model, heads, [4, 5, 6, 7], 12, policy=Threshold(0.0), max_pending=5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt in ([9], [3, 1, 4, 1, 5, 9, 2, 6], list(range(20))):
            g = generate_greedy(model, prompt, 16)
            assert g.tokens == generate_greedy(eager, prompt, 16).tokens
            for t, p in ((0.0, 5), (0.3, 2)):
                a = generate_ada(model, heads, prompt, 16, policy=Threshold(t), max_pending=p)
                assert a.tokens == g.tokens
                assert a.tokens == generate_ada(eager, eager_heads, prompt, 16, policy=Threshold(t), max_pending=p).tokens
    torch._dynamo.reset()


@given(d=st.sampled_from([16, 64, 576, 960]), rows=st.integers(1, 9), scale=st.integers(-4, 4),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), seed=st.integers(0, 10**6))
def test_rms_norm_is_f_rms_norm_bit_for_bit(d, rows, scale, dtype, seed):
    """RMSNorm's PyTorch steps are F.rms_norm's, bit for bit, in every dtype (fused.c's, for
    float32 on the CPU, are test_fused.py's)."""
    import torch.nn.functional as F
    import fused
    from model import RMSNorm
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(d, 1e-5)
    norm.weight.data = torch.randn(d, generator=g).to(dtype)
    x = (torch.randn(1, rows, d, generator=g) * 10.0 ** scale).to(dtype)
    xf = x.float() if dtype == torch.bfloat16 else x
    with fused.off():
        assert torch.equal(norm(x), norm.weight * F.rms_norm(xf, (d,), eps=1e-5).to(dtype))


# --- packed float32 (oneDNN) layers ---------------------------------------------------

@given(out_f=st.integers(1, 300), in_f=st.integers(1, 300), rows=st.integers(1, 9), bias=st.booleans(),
       seed=st.integers(0, 10**6))
def test_packed_linear_is_f_linear(out_f, in_f, rows, bias, seed):
    """Same float32 products as F.linear (another summation order), for any shape and row
    count; unpacking gives back the very weights; rows of it are rows of the product."""
    from quantize import PackedLinear, linear_rows
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g) if bias else None
    x = torch.randn(1, rows, in_f, generator=g)
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    packed = PackedLinear(w, b, keep_weight=True)
    assert_close(packed(x), ref, atol=1e-4, rtol=1e-4, what="packed product")
    assert torch.equal(packed.unpacked().weight, w) and torch.equal(PackedLinear(w).unpacked().weight, w)
    ids = torch.tensor(sorted({seed % out_f, (seed // 7) % out_f}))
    assert_close(linear_rows(packed, ids)(x), ref[..., ids], atol=1e-4, rtol=1e-4, what="shortlist rows")


def test_float32_loads_packed_and_int8_never_silently_skips(tmp_path, monkeypatch):
    """load_model packs float32 on the CPU where the timing says so; the CLI's default picks
    int8 where int8 can take the weights (any width up to quantize.MAX_K inputs; weights on a
    4-bit grid too: int4 only when asked) and float32 elsewhere; quantising a packed model is
    refused, not a no-op."""
    import quantize
    from adadecode import setup
    from quantize import Int4Linear, Int8Linear, PackedLinear, precision, quantize_int8
    for dim, four_bit, want in ((32, False, "float32"), (40, False, "int8"), (64, False, "int8"), (64, True, "int8")):
        folder = tmp_path / f"{dim}{'-q4' if four_bit else ''}"
        save_tiny_checkpoint(folder, tiny_config(dim=dim, ffn=2 * dim, n_heads=4, n_kv_heads=2), four_bit=four_bit)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(prepare_default_model() / name, folder / name)
        monkeypatch.setattr(quantize, "MAX_K", 63 if dim == 32 else 66_000)    # dim 32: an MLP too wide for int8
        model = setup(str(folder), None, "cpu")[0]
        assert precision(model) == want and in_one_block(model)      # moved once, after the conversion
        kinds = {type(m) for m in model.modules()} & {torch.nn.Linear, Linear, PackedLinear, Int8Linear, Int4Linear}
        fp32 = {PackedLinear} if want == "float32" and model.packing["packed"] else {Linear}
        assert kinds == {"float32": fp32, "int8": {Int8Linear}}[want]
        assert not any(isinstance(m, PackedLinear) for m in load_model(folder, pack=False).modules())
    with pytest.raises(InputError, match="packed"):
        quantize_int8(load_model(tmp_path / "64", pack=True))
    with pytest.raises(ValueError, match="pack must be"):
        load_model(tmp_path / "64", pack="always")
    tied = random_llama(0, dtype=torch.float32, tie=True)
    from quantize import pack_float32
    pack_float32(tied, always=True).compile_blocks(backend="eager")    # unpacks: the LM head is the embedding again
    assert tied.output.weight is tied.tok_embeddings.weight


@pytest.mark.parametrize("dense_s, packed_s", [(1.0, 2.0), (2.0, 1.0), (1.0, 0.95)])
def test_float32_packs_only_where_the_timing_says_it_is_faster(monkeypatch, dense_s, packed_s):
    """pack_float32 times both kernels on the model's own matrices and packs only when that
    is at least 10% faster (near a tie model.Linear stays), reporting the timings and what
    computes the unpacked layers; always=True packs whatever they say. Either way the logits
    are F.linear's, up to the summation order."""
    import quantize
    ref = random_llama(1, dtype=torch.float32)
    pairs = []
    monkeypatch.setattr(quantize, "time_packing", lambda p: pairs.extend(p) or (dense_s, packed_s))
    for always in (False, True):
        m = quantize.pack_float32(random_llama(1, dtype=torch.float32), always=always)
        assert {p[0].weight.shape for p in pairs} == {l.weight.shape for l in ref.modules() if isinstance(l, torch.nn.Linear)}
        packed = always or packed_s < 0.9 * dense_s
        assert m.packing == {"packed": packed, "dense_seconds": dense_s, "packed_seconds": packed_s,
                             "dense": "fused.c" if fused.runs(m.norm.weight) else "F.linear"}
        assert isinstance(m.layers[0].feed_forward.w2, quantize.PackedLinear) == packed
        assert isinstance(m.output, quantize.PackedLinear) == packed
        x = torch.randn(1, 3, ref.args.dim)
        assert_close(m.logits(x), ref.logits(x), atol=1e-4, rtol=1e-4, what="logits")
        pairs.clear()


# --- weights in huge pages ------------------------------------------------------------

def in_one_block(model):
    """Whether a model's weights (oneDNN's packed ones aside) lie in one block of memory, as
    in_huge_pages leaves them on Linux; elsewhere it leaves them where they were."""
    import mmap
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in [*model.parameters(), *model.buffers()]
                   if t.layout == torch.strided)
    return not hasattr(mmap, "MADV_HUGEPAGE") or spans[-1][1] - spans[0][0] <= sum(-(-(e - b) // 64) * 64 for b, e in spans)


@pytest.mark.parametrize("kind", ["float64", "float32-packed", "int8", "int4", "tied"])
def test_weights_in_huge_pages_are_the_same_weights(kind):
    """in_huge_pages moves every weight into one block of memory and changes nothing else:
    the same tensor objects with the same values, a tie still a tie, the logits and the
    decoded tokens bit for bit; moving again (after a conversion) works the same way."""
    from checkpoint import in_huge_pages
    from quantize import pack_float32, quantize_int4, quantize_int8
    kw = dict(dim=64, ffn=128, n_heads=4, n_kv_heads=2, n_layers=3, vocab=61, tie=kind == "tied")
    model = random_llama(7, dtype=torch.float64 if kind == "float64" else torch.float32, **kw)
    convert = {"float32-packed": lambda m: pack_float32(m, always=True), "int8": quantize_int8, "int4": quantize_int4}
    model = convert.get(kind, lambda m: m)(model)
    weights = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    dense = lambda t: t.to_dense() if t.layout == torch._mkldnn else t      # oneDNN's packed weights stay in its memory
    before = {i: dense(t).clone() for i, t in weights.items()}
    x = torch.randn(1, 5, model.args.dim, dtype=model.dtype)
    logits, tokens = model.logits(model.run_layers(x, 0, model.new_cache(8))), generate_greedy(model, [1, 2, 3], 12).tokens
    for _ in range(2):
        in_huge_pages(model)
        after = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        assert after.keys() == weights.keys()
        assert all(torch.equal(dense(after[i]), before[i]) and after[i].dtype == before[i].dtype for i in after)
        assert in_one_block(model)
        assert (getattr(model.output, "weight", None) is model.tok_embeddings.weight) == (kind == "tied")
        assert torch.equal(model.logits(model.run_layers(x, 0, model.new_cache(8))), logits)
        assert generate_greedy(model, [1, 2, 3], 12).tokens == tokens
    if kind != "float32-packed":                 # the weights can still be saved as usual (a tie once)
        from safetensors.torch import load, save
        state = {k: v for k, v in model.state_dict().items() if not (kind == "tied" and k == "output.weight")}
        assert all(torch.equal(v, state[k]) for k, v in load(save(state)).items())


def test_the_real_model_is_granted_huge_pages(real):
    """Where Linux's transparent huge pages are on (always, or madvise as on this project's
    machines), most of the loaded model's weights get them, as bench.py reports; where they
    are off, none do, and the model works all the same."""
    from pathlib import Path
    from checkpoint import huge_page_bytes
    folder, model, tok, eos = real
    weights = sum(t.nbytes for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    granted = huge_page_bytes(model)
    if not setting.exists():
        assert not granted
    elif "[never]" in setting.read_text():
        assert granted == 0
    else:
        assert weights / 2 < granted <= weights + (2 << 20)
