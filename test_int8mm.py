"""int8mm: the C kernel gives the PyTorch reference's bits on every path this CPU runs (AMX,
AVX-512 VNNI, AVX2, plain C), whatever the shapes, magnitudes, zero or non-finite rows; a row's
result never depends on its call; 16-bit rows are finer than bfloat16; the build is cached,
atomic, and falls back to the reference where no compiler works."""
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

import int8mm
from int8mm import build, int8mm as mm, int8mm_reference, load, pack, unpack
from quantize import int8_grid


def cpu_flags():
    try:
        return next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return []


# every path the compiler can be asked for and this CPU can run, each built once
VARIANTS = {"native": ["-march=native", "-fopenmp"], "c": ["-fopenmp"]}
if "avx2" in cpu_flags():
    VARIANTS["avx2"] = ["-mavx2", "-fopenmp"]
if "amx_int8" in cpu_flags():                     # then native is AMX's path: build VNNI's without it
    VARIANTS["vnni"] = ["-march=native", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16", "-fopenmp"]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kernels")
    out = {}
    for name, flags in VARIANTS.items():
        path, why = build(tries=[flags], folder=folder)
        assert path is not None, why
        out[name] = load(path)
    assert out["c"][1] == "c"
    if "avx2" in out:
        assert out["avx2"][1] == "avx2"
    if "vnni" in out:
        assert out["vnni"][1] == "avx512-vnni" and out["native"][1] == "amx"
    return out


def same_bits(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@st.composite
def problems(draw):
    M, K, N = draw(st.integers(1, 9)), draw(st.integers(1, 300)), draw(st.integers(1, 23))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10**6)))
    w = torch.randn(N, K, generator=g) * 10 ** draw(st.floats(-4, 2))
    if draw(st.booleans()):
        w[draw(st.integers(0, N - 1))] = 0                          # a row of zero weights
    x = torch.randn(M, K, generator=g) * 10 ** draw(st.floats(-6, 4))
    x[:, draw(st.integers(0, K - 1))] *= draw(st.sampled_from([1.0, 50.0, 1e4]))   # an outlier feature
    special = draw(st.sampled_from([None, 0.0, 1e-35, float("nan"), float("inf"), -float("inf")]))
    if special is not None:
        row = draw(st.integers(0, M - 1))
        x[row] = 0.0 if special == 0.0 else x[row]
        x[row, draw(st.integers(0, K - 1))] = special
    bias = torch.randn(N, generator=g) if draw(st.booleans()) else None
    wq, scale = int8_grid(w)
    return x, wq, scale, bias


@given(problem=problems())
def test_every_kernel_path_gives_the_references_bits(kernels, problem):
    x, wq, scale, bias = problem
    want = int8mm_reference(x, wq, scale, bias)
    wp, wsum = pack(wq), wq.sum(1, dtype=torch.int32)
    assert torch.equal(unpack(wp, *wq.shape), wq)
    for name, (fn, _) in kernels.items():
        got = mm(x, wp, wsum, scale, bias, fn=fn)
        assert same_bits(got, want), f"{name}: max difference {(got - want).abs().nan_to_num().max().item():.3e}"


@given(problem=problems(), order=st.randoms())
def test_a_rows_result_does_not_depend_on_its_call(kernels, problem, order):
    x, wq, scale, bias = problem
    wp, wsum = pack(wq), wq.sum(1, dtype=torch.int32)
    fn = kernels["native"][0]
    x = torch.cat([x, x, x])[:max(len(x), 20)]            # past the kernel's 8 rows per pass too
    together = mm(x, wp, wsum, scale, bias, fn=fn)
    perm = list(range(len(x)))
    order.shuffle(perm)
    shuffled = mm(x[perm], wp, wsum, scale, bias, fn=fn)
    for i, p in enumerate(perm):
        alone = mm(x[p:p + 1], wp, wsum, scale, bias, fn=fn)
        assert same_bits(alone[0], together[p]) and same_bits(shuffled[i], together[p])


def test_sixteen_bit_rows_are_finer_than_bfloat16():
    """On activations with outlier features (as a transformer's are), the product's error
    against float64 (the weights' rounding left out) is far below rounding x to bfloat16's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 576, generator=g)
    x[:, :4] *= 30
    wq, scale = int8_grid(torch.randn(256, 576, generator=g))
    w = wq.double() * scale.double()[:, None]
    exact = x.double() @ w.t()
    ours = mm(x, pack(wq), wq.sum(1, dtype=torch.int32), scale)
    bf16 = x.bfloat16().double() @ w.t()
    err = lambda y: ((y.double() - exact).norm() / exact.norm()).item()
    assert err(ours) < err(bf16) / 10, (err(ours), err(bf16))


def test_the_build_is_cached_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path, why = build(folder=tmp_path)
    assert path is not None, why
    stamp = path.stat().st_mtime_ns
    assert build(folder=tmp_path)[0] == path and path.stat().st_mtime_ns == stamp      # not compiled again
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    path.unlink()
    real_run = subprocess.run

    def interrupted(cmd, **kw):       # the compiler writes its output, then the user presses Ctrl-C
        if "--version" in cmd:
            return real_run(cmd, **kw)
        Path(cmd[-1]).write_bytes(b"half a library")
        raise KeyboardInterrupt
    monkeypatch.setattr(subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(folder=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_without_a_compiler_int8_runs_the_reference_and_says_so(tmp_path, monkeypatch, capsys, kernels):
    assert build(cc=str(tmp_path / "no-cc"), folder=tmp_path) == (None, f"no C compiler ({tmp_path / 'no-cc'}: "
                                                                        "No such file or directory)")
    path, why = build(cc="false", folder=tmp_path)                  # runs, but compiles nothing
    assert path is None and "could not compile int8mm.c" in why
    monkeypatch.setenv("CC", str(tmp_path / "no-cc"))
    monkeypatch.setattr(int8mm, "_kernel", None)
    fn, what = int8mm.kernel()
    assert fn is None and what.startswith("reference: no C compiler")
    assert "int8 runs the PyTorch reference" in capsys.readouterr().err
    x = torch.randn(3, 100)
    wq, scale = int8_grid(torch.randn(20, 100))
    wp, wsum = pack(wq), wq.sum(1, dtype=torch.int32)
    assert torch.equal(mm(x, wp, wsum, scale), mm(x, wp, wsum, scale, fn=kernels["native"][0]))


def test_int8_layers_refuse_gradients():
    wq, scale = int8_grid(torch.randn(8, 16))
    wp, wsum = pack(wq), wq.sum(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="no gradients"):
        mm(torch.randn(2, 16, requires_grad=True), wp, wsum, scale)
    with torch.no_grad():
        assert mm(torch.randn(2, 16, requires_grad=True), wp, wsum, scale).shape == (2, 8)


@given(seed=st.integers(0, 10**6), n=st.integers(1, 40), k=st.integers(1, 130), rows=st.integers(1, 9))
def test_a_shortlist_of_outputs_gives_the_full_layers_bits(seed, n, k, rows):
    """Int8Linear.rows(ids), which the exit heads' shortlist check uses, repacks the chosen
    output rows: each output's result is the full layer's, bit for bit."""
    from quantize import Int8Linear
    g = torch.Generator().manual_seed(seed)
    layer = Int8Linear(torch.randn(n, k, generator=g), torch.randn(n, generator=g))
    ids = torch.randperm(n, generator=g)[:max(1, n // 3)]
    x = torch.randn(1, rows, k, generator=g)
    assert torch.equal(layer.rows(ids)(x), layer(x)[..., ids])
    assert torch.equal(layer.wq, int8_grid(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))[0])


def test_a_damaged_library_in_the_cache_is_built_again(tmp_path, monkeypatch, capsys):
    """An empty or truncated file where the compiled kernel should be (a full disk, a copy
    cut short) is not loaded blindly: it is rebuilt, and the kernel runs."""
    monkeypatch.setenv("ADADECODE_HOME", str(tmp_path))
    path, why = build()
    assert path is not None and path.parent == tmp_path / "kernels", why
    path.write_bytes(path.read_bytes()[:100])
    monkeypatch.setattr(int8mm, "_kernel", None)
    fn, what = int8mm.kernel()
    assert fn is not None and not what.startswith("reference") and capsys.readouterr().err == ""
    x = torch.randn(3, 70)
    wq, scale = int8_grid(torch.randn(21, 70))
    assert torch.equal(mm(x, pack(wq), wq.sum(1, dtype=torch.int32), scale), int8mm_reference(x, wq, scale))


@pytest.mark.parametrize("sign", [1, -1])
def test_the_largest_sums_are_exact(kernels, sign):
    """5000 inputs at the extremes, every product +-32767 * 127: AVX2's int32 lanes move into
    int64 every 1024 inputs, the byte paths' sums stay within int32, and all give the
    reference's bits (an overflow would be off by 2^32 times something)."""
    K = 5000
    x = torch.stack([torch.ones(K), -torch.ones(K), torch.linspace(-1, 1, K)])
    wq = torch.full((19, K), 127 * sign, dtype=torch.int8)
    wq[3, ::2] = -127 * sign
    scale = torch.rand(19) + 0.5
    want = int8mm_reference(x, wq, scale)
    assert want[0, 0].item() == pytest.approx(sign * 127 * K * scale[0].item(), rel=1e-6)
    for name, (fn, _) in kernels.items():
        got = mm(x, pack(wq), wq.sum(1, dtype=torch.int32), scale, fn=fn)
        assert same_bits(got, want), name
