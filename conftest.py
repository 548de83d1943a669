"""Shared test helpers: tiny random Llama checkpoints, the real default model, assert_close."""
import os
import random

import pytest
import torch
from hypothesis import settings

from checkpoint import Tokenizer, eos_ids, load_model, prepare_default_model

# bounded and derandomised in CI, so a run is reproducible and fits the time budget
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_configure(config):
    """ADADECODE_TEST_DEVICE (default cpu) says where test_parity.py's float properties run;
    a value this machine cannot use stops the run with one line, before any test."""
    from cli import check_device
    from model import InputError
    name = os.environ.get("ADADECODE_TEST_DEVICE") or "cpu"
    try:
        check_device(name)
    except InputError as e:
        raise pytest.UsageError(f"ADADECODE_TEST_DEVICE={name!r}: {e}") from None


def assert_close(a, b, atol=1e-6, rtol=1e-6, what="tensors"):
    diff = (a.double() - b.double()).abs()
    ok = torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol)
    assert ok, f"{what} differ: max {diff.max().item():.3e}, mean {diff.mean().item():.3e}"


def tiny_config(seed=0, n_layers=4, dim=32, n_heads=4, n_kv_heads=2, vocab=97, tie=False, rope_scaling=None,
                rope_theta=10000.0, max_pos=256, ffn=None, arch="llama"):
    name = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    cfg = dict(architectures=[name], model_type=arch, hidden_size=dim, intermediate_size=ffn or 2 * dim + 8,
               num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
               vocab_size=vocab, rms_norm_eps=1e-5, rope_theta=rope_theta, max_position_embeddings=max_pos,
               tie_word_embeddings=tie, hidden_act="silu", bos_token_id=1, eos_token_id=2)
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
    return cfg


def save_tiny_checkpoint(folder, cfg, seed=0, scale=1.0, four_bit=False):
    """A random Hugging Face LlamaForCausalLM or Qwen2ForCausalLM saved as a checkpoint folder.
    `scale` widens the random weights so that tiny models make confident, varied predictions;
    `four_bit` rounds the blocks' matrices to a 4-bit grid, as a checkpoint converted from a
    Q4_1 GGUF file has them."""
    import transformers
    torch.manual_seed(seed)
    prefix = {"llama": "Llama", "qwen2": "Qwen2"}[cfg["model_type"]]
    config = getattr(transformers, prefix + "Config")(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    hf = getattr(transformers, prefix + "ForCausalLM")(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * scale / p.shape[-1] ** 0.5)
            if four_bit and name.startswith("model.layers") and p.dim() == 2:
                g = p.view(p.shape[0], -1, 32)                  # 16 levels from each group's min to its max
                lo, step = g.amin(-1, keepdim=True), (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
                p.copy_((lo + step * ((g - lo) / step).round()).view(p.shape))
    hf.save_pretrained(folder)
    return hf


def random_llama(seed, dtype=torch.float64, device="cpu", **kw):
    """A tiny random Llama built directly (no files), for fast property tests; the same
    weights on any device (drawn on the CPU, then moved)."""
    from model import ModelArgs, Transformer
    args = ModelArgs.from_hf(tiny_config(**kw))
    g = torch.Generator().manual_seed(seed)
    model = Transformer(args).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, dtype=dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 2.0 / p.shape[-1] ** 0.5)
    return model.to(device).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def real():
    """The default model (SmolLM2-135M-Instruct) in float32, with tokenizer and EOS ids."""
    folder = prepare_default_model()
    model = load_model(folder, dtype=torch.float32)
    tok = Tokenizer(folder)
    return folder, model, tok, eos_ids(model, tok)


@pytest.fixture
def rng():
    return random.Random(0)
