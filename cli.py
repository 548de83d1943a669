"""
What every command line here shares. How it fails: bad input gets one line and exit code
2, never a traceback from deep inside torch (model.InputError, raised wherever the input
is read); Ctrl-C, a closed pipe and a full disk get one line too. And what it checks
before the long work rather than after it: the prompt file (read_prompts), the device
(default_device, check_device), an output folder (check_writable).
"""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from model import InputError


def check_writable(folder, what, when="before the long work"):
    """`folder` can take the results: it exists and a file can be written in it, or its
    nearest existing parent can (so it can be made). Tried with a temporary file, removed at
    once: os.access says yes to root even on a read-only mount or in /proc."""
    folder = Path(folder)
    parent = next(p for p in [folder, *folder.parents] if p.exists())
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise InputError(f"{what}: {parent} is not writable ({e.strerror}; checked now, {when})") from None


def run_cli(main):
    """Run a command line's main() as a user expects: its exit code; bad input gets one line
    and exit code 2; Ctrl-C one line and 130; a closed output pipe (`| head`) a quiet exit;
    a failed file operation (a full disk) one line and 1."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return 141
    except OSError as e:               # the disk filled up, a file vanished mid-run: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


def read_prompts(path):
    """JSON Lines: each line has "prompt", or "turns" (FastChat/MT-bench; first turn used)."""
    try:
        lines = open(path, encoding="utf-8-sig").read().splitlines()      # -sig: a leading byte-order mark is skipped
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    prompts = []
    for n, line in enumerate(lines, 1):     # n: the line number an editor shows, blank lines counted
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not JSON ({e.msg})")
        text = row.get("prompt") if isinstance(row, dict) else None
        if text is None and isinstance(row, dict) and "turns" in row:
            turns = row["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise InputError(f"{path}:{n}: \"turns\" must be a non-empty list of strings")
            text = turns[0]
        if not isinstance(text, str) or not text:
            raise InputError(f"{path}:{n}: needs a non-empty \"prompt\" or \"turns\"")
        prompts.append({**row, "prompt": text})
    if not prompts:
        raise InputError(f"{path}: no prompts in the file")
    return prompts


def default_device():
    """cuda when torch can use it, else cpu, with a warning when a GPU is there but unusable."""
    if torch.cuda.is_available():
        return "cuda"
    if Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi"):
        why = "this torch build has no CUDA" if torch.version.cuda is None else "the driver or GPU is unusable"
        print(f"warning: an NVIDIA GPU is present but {why} (torch {torch.__version__}); running on the CPU",
              file=sys.stderr)
    return "cpu"


def check_device(device):
    """The torch.device for a --device value, or a one-line InputError saying why not."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1)") from None
    if d.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: only cpu and cuda are supported")
    if d.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no usable GPU or driver"
        raise InputError(f"--device {device}: CUDA is not available ({why}, torch {torch.__version__}); use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return d
