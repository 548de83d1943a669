"""
How every command line here fails: bad input gets one line and exit code 2, never a
traceback from deep inside torch (model.InputError, raised wherever the input is read);
Ctrl-C, a closed pipe and a full disk get one line too. And the check that an output
folder is writable, made before the long work rather than after it.
"""
import os
import sys
import tempfile
from pathlib import Path

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
