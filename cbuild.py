"""
The project's two C files (int8mm.c: int8's matmul; fused.c: a layer's small steps) are
compiled on first use with the machine's C compiler (`cc`, or $CC) into the model cache
(ADADECODE_HOME/kernels/), once per source, compiler and CPU. Where no compiler works, each
caller runs its PyTorch definition instead and says so once.

    path, why = build(source)          the library's path, or (None, why not)
    lib, why = library(source, load)   build and load it; a damaged cached file is built again
"""
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared"]
TRIES = [["-march=native", "-fopenmp"], ["-march=native"], []]   # no OpenMP (macOS's clang), no -march=native


def cache_dir():
    return Path(os.environ.get("ADADECODE_HOME", Path.home() / ".cache" / "adadecode")) / "kernels"


def machine_signature():
    """What -march=native depends on: the CPU's model name and feature flags (Linux), or
    whatever the platform says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(next((l for l in lines if l.startswith(k)), "") for k in ("model name", "flags"))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def build(source, cc=None, tries=TRIES, folder=None):
    """Compile `source` into `folder` (default: the cache), once for this source, compiler and
    CPU: the library's path, or (None, why) when no try compiles. Written under a temporary
    name and renamed when complete, so an interrupted build or two builds at once leave
    nothing half-written."""
    source = Path(source)
    cc = cc or os.environ.get("CC") or "cc"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"no C compiler ({cc}: {getattr(e, 'strerror', None) or e})"
    key = hashlib.sha256(source.read_bytes() + repr((cc, version, FLAGS, tries, machine_signature())).encode())
    folder = Path(folder or cache_dir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="adadecode-kernels-"))    # an unwritable cache: build for this run
    lib = folder / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib, None
    errors = []
    for extra in tries:
        tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
        try:
            r = subprocess.run([cc, *FLAGS, *extra, str(source), "-o", str(tmp)], capture_output=True, text=True,
                               timeout=300)
            if r.returncode == 0:
                os.replace(tmp, lib)
                return lib, None
            errors.append((r.stderr.strip().splitlines() or ["failed"])[-1])
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(str(e))
        finally:
            tmp.unlink(missing_ok=True)
    return None, f"{cc} could not compile {source.name} ({errors[0]})"


def library(source, load):
    """`load(path)` of source's compiled library: (what load returned, None), or (None, why).
    A cached file that cannot be loaded (empty or truncated: a full disk, a copy cut short)
    is deleted and built once more."""
    path, why = build(source)
    for attempt in (0, 1):
        if path is None:
            return None, why
        try:
            return load(path), None
        except OSError as e:
            why = f"cannot load {path} ({e})"
            if attempt == 0:
                path.unlink(missing_ok=True)
                path, why = build(source)
    return None, why
