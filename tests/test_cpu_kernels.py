"""Every kernel family's own math on the CPU: the public ops on CPU tensors run the generated
programs through the ``cpu`` schedule (schedules/cpu.toml, TileLang's C backend), and the
results are compared with the float64 references, as tests/gpu does on the H100.

Tiny shapes (N < 256, D = 32) keep it fast; most of the time is compiling. The artifacts are
built once per session in a process pool (one compile per core) into the user cache, where the
ops then find them (a second run compiles nothing). Outputs are NaN-poisoned (FSAGEN_POISON=1).
The comparison helpers are tests/gpu's and test_compress's, which take any device.
"""
import concurrent.futures
import os
import time

import pytest
import torch

import fsagen
from fsagen.reference_cmp import cmp_attention_reference, select_blocks_reference
from fsagen.reference_nsa import swa_reference
from fsagen.schedule import load_schedule
from fsagen.spec import KernelSpec
from fsagen.testing import random_cu_seqlens, random_topk_idx
from gpu.test_dense_gpu import _clear_rows, _compare, _cu_cmp, _ref_grads, _reference_block_scores, _run
from gpu.test_slc_gpu import _reference
from test_compress import _cu, _lengths, _params, compare_with_grads

HKV, G, D = 2, 2, 32
KS, STRIDE, SEL_BS, SEL_TOPK = 32, 16, 32, 4
SLC_BS, SLC_TOPK = 32, 4
BF16, FP16 = torch.bfloat16, torch.float16
DTYPE_NAMES = {BF16: "bfloat16", FP16: "float16"}


def _spec(branch, phase, dtype, g=G, **fields):
    values = dict(block_size=0, topk=0)
    values.update(fields)
    return KernelSpec(branch=branch, phase=phase, G=g, D=D, dtype=DTYPE_NAMES[dtype], **values)


# (spec, forced loop order or None) of every kernel the tests below run
KERNELS = [
    *[(_spec(branch, phase, dtype), None) for branch, dtype in (("swa", BF16), ("cmp", BF16), ("swa", FP16))
      for phase in ("fwd", "bwd")],
    (_spec("sel", "fwd", BF16, block_size=SEL_BS, topk=SEL_TOPK, kernel_size=KS, stride=STRIDE), None),
    *[(_spec("slc", phase, BF16, block_size=SLC_BS, topk=SLC_TOPK), order)
      for order in ("kv_outer", "q_outer") for phase in ("fwd", "bwd")],
    (_spec("dec", "fwd", BF16, block_size=16), None),  # decode over a cache of 16-row pages
    # compression (no query heads: G = 1); the decode test's cache compresses with it too
    *[(_spec("comp", phase, dtype, g=1, kernel_size=KS, stride=STRIDE), None) for dtype in (BF16, FP16)
      for phase in ("fwd", "bwd")],
    *[(_spec("gate", phase, dtype, g=1), None) for dtype in (BF16, FP16) for phase in ("fwd", "bwd")],
]


def _build(case):
    from fsagen.cache import ensure_artifact

    spec, order = case
    ensure_artifact(spec, load_schedule("cpu").plan(spec, loop_order=order), "cpu")


@pytest.fixture(scope="session")
def cpu_artifacts():
    """Compile every kernel of this module for the cpu schedule, in parallel, once."""
    jobs = min(len(KERNELS), os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        list(pool.map(_build, KERNELS))


@pytest.fixture(autouse=True)
def _setup(cpu_artifacts, monkeypatch):
    monkeypatch.setenv("FSAGEN_POISON", "1")


def _gen():
    return torch.Generator().manual_seed(time.time_ns() % 2**31)


def _layout():
    # a sequence shorter than a window, ones at and past block / tile boundaries
    return torch.tensor([0, 1, 32, 65, 135, 235], dtype=torch.int32)


def _randn(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("window", [1, 20])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_sliding_window_attention_on_cpu(dtype, window):
    gen, cu = _gen(), _layout()
    n = int(cu[-1])
    q, k, v, do = (_randn(gen, n, h, D, dtype=dtype) for h in (HKV * G, HKV, HKV, HKV * G))
    o, lse, grads = _run(lambda a, b, c: fsagen.sliding_window_attention(a, b, c, cu, window, return_lse=True),
                         q, k, v, do)
    assert o.device.type == "cpu"
    ro, rl, rgrads = _ref_grads(lambda a, b, c: swa_reference(a, b, c, cu, window), q, k, v, do)
    _compare(o, lse, grads, ro, rl, rgrads, dtype, f"window={window} {dtype} N={n}", "swa-cpu")


@pytest.mark.parametrize("branch,q_split", [("swa", 0), ("cmp", 0), ("cmp", 40)])
def test_dense_backward_dkdv_modes_on_cpu(branch, q_split, edited_schedule):
    """dK / dV with ``dkdv_rows = "gather_async"`` (the gathered tiles in two buffers used in turn;
    the CPU copies synchronously, so this checks the loop's bookkeeping; the cpu schedule's
    ``"gather"`` is what the other tests run), whole and in runs of ``q_split`` queries, against
    the float64 reference: the same layouts of _layout() (a sequence shorter than a tile, tiles
    reading past a sequence's end into the next)."""
    edited_schedule("cpu", 'dkdv_rows = "gather"', 'dkdv_rows = "gather_async"')
    edited_schedule("cpu", "q_split = 0", f"q_split = {q_split}")
    spec = _spec(branch, "bwd", BF16)
    plan = load_schedule("cpu").plan(spec)
    assert (plan.knob("dkdv_rows"), plan.knob("q_split")) == ("gather_async", q_split)
    if branch == "swa":
        test_sliding_window_attention_on_cpu(BF16, 20)
    else:
        test_compressed_attention_on_cpu()


def test_compressed_attention_on_cpu():
    gen, cu = _gen(), _layout()
    cuc = _cu_cmp(cu, KS, STRIDE)
    n, nc = int(cu[-1]), int(cuc[-1])
    q, do = (_randn(gen, n, HKV * G, D, dtype=BF16) for _ in range(2))
    k, v = (_randn(gen, nc, HKV, D, dtype=BF16) for _ in range(2))
    o, lse, grads = _run(lambda a, b, c: fsagen.compressed_attention(a, b, c, cu, cuc, KS, STRIDE, return_lse=True),
                         q, k, v, do)
    ro, rl, rgrads = _ref_grads(lambda a, b, c: cmp_attention_reference(a, b, c, cu, cuc, KS, STRIDE), q, k, v, do)
    _compare(o, lse, grads, ro, rl, rgrads, BF16, f"N={n} Nc={nc}", "cmp-cpu")


def test_select_blocks_on_cpu():
    """Exact on every row whose reference scores separate the chosen blocks clearly."""
    gen, cu = _gen(), _layout()
    cuc = _cu_cmp(cu, KS, STRIDE)
    n, nc = int(cu[-1]), int(cuc[-1])
    q = _randn(gen, n, HKV * G, D, dtype=BF16, scale=2.0)
    k, v = (_randn(gen, nc, HKV, D, dtype=BF16) for _ in range(2))
    init, local = 1, 2
    _, lse = fsagen.compressed_attention(q, k, v, cu, cuc, KS, STRIDE, return_lse=True)
    got = fsagen.select_blocks(q, k, lse, cu, cuc, KS, STRIDE, SEL_BS, SEL_TOPK, init, local)
    _, _, p = cmp_attention_reference(q, k, v, cu, cuc, KS, STRIDE)
    ref = select_blocks_reference(p, cu, HKV, KS, STRIDE, SEL_BS, SEL_TOPK, init, local)
    assert got.dtype == torch.int32 and got.shape == ref.shape
    clear = _clear_rows(_reference_block_scores(p, cu, KS, STRIDE, SEL_BS), cu, SEL_BS, SEL_TOPK, init, local, 1e-3)
    assert clear.float().mean() > 0.5, "too few rows with a clear margin to check anything"
    same = (got == ref).all(-1)
    assert (same | ~clear).all(), f"{int((clear & ~same).sum())} clear rows differ from the reference"


@pytest.mark.parametrize("loop_order", ["kv_outer", "q_outer"])
def test_selected_attention_on_cpu(loop_order):
    gen = _gen()
    cu = random_cu_seqlens(250, 3, block_size=SLC_BS, generator=gen)
    n = int(cu[-1])
    idx = random_topk_idx(cu, HKV, SLC_TOPK, SLC_BS, generator=gen)
    q, k, v = (_randn(gen, n, h, D, dtype=BF16).requires_grad_() for h in (HKV * G, HKV, HKV))
    o, lse = fsagen.selected_attention(q, k, v, idx, SLC_BS, cu, return_lse=True, loop_order=loop_order)
    do = _randn(gen, n, HKV * G, D, dtype=BF16)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ro, rl, *rgrads = _reference(q, k, v, idx, cu, SLC_BS, do)
    _compare(o.detach(), lse, grads, ro, rl, rgrads, BF16, f"{loop_order} N={n}", "slc-cpu")


@pytest.mark.parametrize("chunk_rows,acc_bytes", [(2, None), (26, None), (26, 13 * 512 * 3)])
def test_kv_outer_query_chunks_on_cpu(chunk_rows, acc_bytes, edited_schedule, monkeypatch):
    """kv_outer with its block index cut into query chunks of 1 and 13 tokens (``chunk_rows`` //
    G): same kernels (a glue-only knob), results still equal the float64 reference. With
    ``acc_bytes`` the o / dq accumulator is cut into windows of 3 chunks (512 bytes a token here):
    one launch per window over the same index."""
    if acc_bytes:
        monkeypatch.setenv("FSAGEN_ACC_BYTES", str(acc_bytes))
    edited_schedule("cpu", "chunk_rows = 0", f"chunk_rows = {chunk_rows}")
    spec = _spec("slc", "fwd", BF16, block_size=SLC_BS, topk=SLC_TOPK)
    assert load_schedule("cpu").plan(spec, loop_order="kv_outer").knob("chunk_rows") == chunk_rows
    test_selected_attention_on_cpu("kv_outer")


def test_kv_outer_async_gather_on_cpu(edited_schedule):
    """kv_outer with ``gather = "async"`` (the next tile's rows copied while the current one
    computes, two Q / dO tiles used in turn): the CPU spells the copy synchronously, so this checks
    the double-buffered loop's bookkeeping (which tile, which buffer, the last tile, dead rows)
    against the float64 reference, forward and backward, items of several tiles (tiles_per_item)."""
    edited_schedule("cpu", 'gather = "sync"', 'gather = "async"')
    spec = _spec("slc", "fwd", BF16, block_size=SLC_BS, topk=SLC_TOPK)
    assert load_schedule("cpu").plan(spec, loop_order="kv_outer").knob("gather") == "async"
    test_selected_attention_on_cpu("kv_outer")


def test_q_outer_forward_in_key_steps_on_cpu(edited_schedule):
    """q_outer's forward stepping through each selected block in 16-key halves (knob q_keys)
    still equals the float64 reference (block 32: two steps a block, the causal cut inside)."""
    edited_schedule("cpu", "q_keys = 0", "q_keys = 16")
    spec = _spec("slc", "fwd", BF16, block_size=SLC_BS, topk=SLC_TOPK)
    assert load_schedule("cpu").plan(spec, loop_order="q_outer").knob("q_keys") == 16
    test_selected_attention_on_cpu("q_outer")


@pytest.mark.parametrize("kind", ["mean", "weighted"])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_compress_on_cpu(dtype, kind, monkeypatch):
    """fsagen.compress on CPU tensors runs the comp kernels (forward, dk / dv, and dweight for
    weighted pooling; the torch path is made to fail) and matches the float64 reference. Varlen:
    empty entries, sequences shorter than a window, exactly one, and lengths off the stride."""
    from fsagen import compression, pooling

    def no_torch_path(*args):
        raise AssertionError("compress ran its torch path, not the kernels")

    def spy(name, glue):
        def call(*args):
            calls.append(name)
            return glue(*args)
        return call

    calls = []
    monkeypatch.setattr(compression, "_pool_torch", no_torch_path)
    for name in ("forward", "backward"):  # the kernels' glue (fsagen::compress_pool and its backward)
        monkeypatch.setattr(pooling, name, spy(name, getattr(pooling, name)))
    gen = _gen()
    cu = _cu(_lengths(KS, STRIDE))
    n = int(cu[-1])
    k, v = (_randn(gen, n, HKV, D, dtype=dtype) for _ in range(2))
    params = _params(kind, False, HKV, KS, D, D, dtype, gen)
    errs, k_cmp, _ = compare_with_grads(k, v, cu, KS, STRIDE, kind, params, gen, 1e-2 if dtype == BF16 else 2e-3)
    assert calls == ["forward", "backward"] and k_cmp.shape[0] > 0 and "dk" in errs, (calls, errs)


def _gate_reference(outs, gates, do):
    """float64 gated sum and its gradients (o_cmp, o_slc, o_swa, gates)."""
    leaves = [t.detach().double().requires_grad_() for t in (*outs, gates)]
    g = (leaves[3] if gates.dim() == 3 else leaves[3][:, None, :]).unsqueeze(-1)
    o = sum(g[:, :, b] * leaves[b] for b in range(3))
    return o.detach(), torch.autograd.grad(o, leaves, do.double())


@pytest.mark.parametrize("per_token", [False, True], ids=["per-head", "per-token"])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_gate_sum_on_cpu(dtype, per_token, monkeypatch):
    """The gated sum of the three branches runs the gate kernels (forward and backward; the op's
    glue is spied on) and matches the float64 sum and gradients; 37 x 6 rows is not a multiple of
    the 16-row tiles, and per-token gates broadcast over the heads (their gradient sums them)."""
    from fsagen import gating

    calls = []
    for name in ("forward", "backward"):
        glue = getattr(gating, name)
        monkeypatch.setattr(gating, name, lambda *a, _g=glue, _n=name: calls.append(_n) or _g(*a))
    gen = _gen()
    n, hq = 37, 6
    outs = [_randn(gen, n, hq, D, dtype=dtype).requires_grad_() for _ in range(3)]
    gates = torch.rand((n, 3) if per_token else (n, hq, 3), generator=gen).to(dtype).requires_grad_()
    o = gating.gate_sum(*outs, gates)
    do = _randn(gen, n, hq, D, dtype=dtype)
    grads = torch.autograd.grad(o, (*outs, gates), do)
    ro, rgrads = _gate_reference(outs, gates, do)
    assert calls == ["forward", "backward"] and o.dtype == dtype and grads[3].shape == gates.shape
    tol = 1e-2 if dtype == BF16 else 2e-3
    for name, got, want in zip(("o", "d_cmp", "d_slc", "d_swa", "d_gates"), (o, *grads), (ro, *rgrads)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < tol, (name, err)


def test_gate_sum_op_passes_opcheck():
    from fsagen import ops_gate  # noqa: F401

    gen = _gen()
    outs = [_randn(gen, 9, 4, D, dtype=BF16) for _ in range(3)]
    for gates in (torch.rand(9, 4, 3, generator=gen).to(BF16), torch.rand(9, 3, generator=gen).to(BF16)):
        args = (*(t.clone().requires_grad_() for t in outs), gates.requires_grad_())
        torch.library.opcheck(torch.ops.fsagen.gate_sum.default, args)


def _swa_fwd_stage():
    from fsagen.cache import get_kernel

    spec = KERNELS[0][0]
    assert (spec.branch, spec.phase, spec.dtype) == ("swa", "fwd", "bfloat16")
    return get_kernel(spec, arch="cpu")["dense_fwd"]


def test_cpu_stage_checks_its_arguments():
    """The ctypes loader checks what TileLang's host wrapper checks on a GPU, naming the buffer."""
    fn = _swa_fwd_stage()
    n, cu = 40, torch.tensor([0, 40], dtype=torch.int32)
    q, k, v = (torch.zeros(n, h, D, dtype=BF16) for h in (HKV * G, HKV, HKV))
    tiles = torch.zeros(1, 2, dtype=torch.int32)
    o, lse = torch.empty(n, HKV * G, D, dtype=BF16), torch.empty(n, HKV * G)
    with pytest.raises(ValueError, match="expected 11 arguments"):
        fn(q, k, v)
    with pytest.raises(ValueError, match="K must have dtype bfloat16 or uint16"):
        fn(q, k.half(), v, tiles, cu, cu, o, lse, 20, 0, 0.1)
    with pytest.raises(ValueError, match=r"O.shape\[0\]=39 but Q gives N=40"):
        fn(q, k, v, tiles, cu, cu, o[:39], lse, 20, 0, 0.1)
    with pytest.raises(ValueError, match=r"O.shape\[2\] must be 32"):
        fn(q, k, v, tiles, cu, cu, o[..., :16].contiguous(), lse, 20, 0, 0.1)
    with pytest.raises(ValueError, match="V must be contiguous"):
        fn(q, k, v.transpose(0, 1).contiguous().transpose(0, 1), tiles, cu, cu, o, lse, 20, 0, 0.1)
    with pytest.raises(ValueError, match="lse must have 2 dims"):
        fn(q, k, v, tiles, cu, cu, o, lse[..., None], 20, 0, 0.1)


def test_nsa_decode_several_tokens_per_sequence_on_cpu():
    """Speculative decoding: a sequence listed n times decodes its last n tokens in one step, each
    row seeing its own prefix (its windows, blocks and window; not the later draft tokens). Rows of
    one sequence need not be adjacent. Every row against the float64 reference at its position, through
    nsa_decode and through decode_attention (per branch)."""
    from fsagen.decode import decode_attention, nsa_decode
    from fsagen.kv_cache import NSAKVCache
    from fsagen.reference_decode import nsa_decode_reference
    from fsagen.testing import rel_err

    # 1 token of seq 0; 3 of seq 1 (positions 63..65: a window completes at 63, a block starts at 64);
    # 4 of seq 2 (94..97: a window completes at 95)
    lengths, page, bs, topk, window = [33, 66, 98], 16, 32, 3, 20
    rows = [0, 1, 1, 2, 1, 2, 2, 2]
    rules = dict(block_size=bs, topk=topk, init_blocks=1, local_blocks=1, window_size=window)
    gen = torch.Generator().manual_seed(4)
    cache = NSAKVCache(len(lengths), 64, page, 128, HKV, D, kernel_size=KS, stride=STRIDE, dtype=BF16)
    cache.append([0, 1, 2], *(torch.randn(sum(lengths), HKV, D, generator=gen).to(BF16) for _ in range(2)), lengths)
    q = torch.randn(len(rows), HKV * G, D, generator=gen).to(BF16)
    gates = torch.rand(len(rows), 3, generator=gen)
    o, parts = nsa_decode(q, cache, rows, gates, **rules, return_parts=True)
    branch_outs = {"swa": decode_attention(q, cache, rows, "swa", window_size=window)[0],
                   "cmp": decode_attention(q, cache, rows, "cmp")[0],
                   "slc": decode_attention(q, cache, rows, "slc", topk_idx=parts["topk_idx"], block_size=bs)[0]}
    for s, n in enumerate(lengths):
        mine = [r for r, t in enumerate(rows) if t == s]
        positions = torch.arange(n - len(mine), n)
        kr, vr = cache.raw(s)
        kc, vc = cache.compressed(s)
        ro, rp = nsa_decode_reference(q[mine], kr, vr, kc, vc, positions, gates[mine].double(), kernel_size=KS,
                                      stride=STRIDE, **rules, return_parts=True)
        assert torch.equal(parts["topk_idx"][:, mine], rp["topk_idx"]), f"sequence {s}: selection differs"
        for name, got, want in (("o", o[mine], ro), *((k, parts[k][mine], rp[k]) for k in ("o_cmp", "o_slc", "o_swa"))):
            err = rel_err(got, want)
            assert err < 1e-2, f"sequence {s} rows {mine}: {name} rel err {err}"
        for name, got in branch_outs.items():  # decode_attention takes the same rows
            err = rel_err(got[mine], rp[f"o_{name}"])
            assert err < 1e-2, f"decode_attention {name}: sequence {s} rows {mine}: rel err {err}"
    none, none_parts = nsa_decode(q[:0], cache, [], gates[:0], **rules, return_parts=True)  # no rows: no launch
    assert none.shape == (0, HKV * G, D) and none_parts["topk_idx"].shape == (HKV, 0, topk)
    with pytest.raises(ValueError, match="last n tokens"):
        nsa_decode(q[:1].expand(40, -1, -1).contiguous(), cache, [0] * 40, gates[:1].expand(40, -1), **rules)


def test_cpu_artifact_holds_c_source_and_library():
    fn = _swa_fwd_stage()
    source = fn.library.with_suffix(".c").read_text()
    assert "__global__" not in source and "for (int32_t" in source
    assert [a.get("dim") for a in fn.abi if "dim" in a]  # symbolic sizes travel as arguments


def test_nsa_decode_on_cpu():
    """The decode step (cmp with scores, the group-summed probabilities, selection, slc + swa,
    gates) on a CPU cache: block for block the reference's selection, every part within bf16."""
    from fsagen.decode import nsa_decode
    from fsagen.kv_cache import NSAKVCache
    from fsagen.reference_decode import nsa_decode_reference
    from fsagen.testing import rel_err

    lengths, page, bs, topk, window = [1, 31, 32, 33, 70, 100], 16, 32, 3, 20
    rules = dict(block_size=bs, topk=topk, init_blocks=1, local_blocks=1, window_size=window)
    gen = torch.Generator().manual_seed(3)
    cache = NSAKVCache(len(lengths), 64, page, 128, HKV, D, kernel_size=KS, stride=STRIDE, dtype=BF16)
    seqs = list(range(len(lengths)))
    cache.append(seqs, *(torch.randn(sum(lengths), HKV, D, generator=gen).to(BF16) for _ in range(2)), lengths)
    q = torch.randn(len(lengths), HKV * G, D, generator=gen).to(BF16)
    gates = torch.rand(len(lengths), HKV * G, 3, generator=gen)
    o, parts = nsa_decode(q, cache, seqs, gates, **rules, return_parts=True)
    for b, n in enumerate(lengths):
        kr, vr = cache.raw(b)
        kc, vc = cache.compressed(b)
        ro, rp = nsa_decode_reference(q[b:b + 1], kr, vr, kc, vc, torch.tensor([n - 1]), gates[b:b + 1].double(),
                                      kernel_size=KS, stride=STRIDE, **rules, return_parts=True)
        assert torch.equal(parts["topk_idx"][:, b:b + 1], rp["topk_idx"]), f"length {n}: selection differs"
        for name, got, want in (("o", o[b:b + 1], ro), *((k, parts[k][b:b + 1], rp[k]) for k in ("o_cmp", "o_slc", "o_swa"))):
            err = rel_err(got, want)
            assert err < 1e-2, f"length {n}: {name} rel err {err}"


def test_backward_reuses_the_forward_block_index(monkeypatch):
    """kv_outer: the backward of a call uses the block index its forward built (one build per
    call, not two) and still equals the float64 reference; after an in-place write to topk_idx,
    with other topk values, or once the forward's lse is gone, the index is rebuilt or dropped;
    inference mode keeps nothing."""
    import gc

    import fsagen.ops  # noqa: F401  (registers torch.ops.fsagen.*)
    import fsagen.slc as glue

    builds = []
    real = glue.build_block_index
    monkeypatch.setattr(glue, "build_block_index", lambda *a, **kw: builds.append(a[0]) or real(*a, **kw))
    gen = _gen()
    cu = random_cu_seqlens(250, 3, block_size=SLC_BS, generator=gen)
    n = int(cu[-1])
    idx = random_topk_idx(cu, HKV, SLC_TOPK, SLC_BS, generator=gen)
    q, k, v = (_randn(gen, n, h, D, dtype=BF16) for h in (HKV * G, HKV, HKV))
    do = _randn(gen, n, HKV * G, D, dtype=BF16)
    args = (cu, SLC_BS, D ** -0.5, "kv_outer")
    ro, rl, *rgrads = _reference(q, k, v, idx, cu, SLC_BS, do)

    o, lse = torch.ops.fsagen.slc_fwd(q, k, v, idx, *args)
    assert len(builds) == 1 and len(glue.FORWARD_INDEX) >= 1
    kept = glue.FORWARD_INDEX.get(lse, idx, cu, SLC_BS)
    assert kept
    for index in kept.values():  # only what the backward reads is kept: no slot numbers
        assert index.ent_k.untyped_storage().nbytes() == 0 and index.ent_q.numel() > 0
    grads = torch.ops.fsagen.slc_bwd(do, q, k, v, o, lse, idx, *args)
    assert len(builds) == 1, "the backward sorted the selection again"
    _compare(o, lse, grads, ro, rl, rgrads, BF16, f"kv_outer N={n} (forward's index)", "slc-cpu")

    other = random_topk_idx(cu, HKV, SLC_TOPK, SLC_BS, generator=gen)
    ro2, rl2, *rgrads2 = _reference(q, k, v, other, cu, SLC_BS, do)
    o2, lse2 = torch.ops.fsagen.slc_fwd(q, k, v, other, *args)
    idx.copy_(other)  # same values as the forward's now, but written in place after the forward
    builds.clear()
    grads = torch.ops.fsagen.slc_bwd(do, q, k, v, o2, lse2, idx, *args)
    assert len(builds) == 1, "a topk_idx that is not the forward's own tensor must not reuse its index"
    _compare(o2, lse2, grads, ro2, rl2, rgrads2, BF16, f"kv_outer N={n} (rebuilt)", "slc-cpu")

    builds.clear()
    other.add_(0)  # the forward's own tensor, written in place since
    torch.ops.fsagen.slc_bwd(do, q, k, v, o2, lse2, other, *args)
    assert len(builds) == 1

    before = len(glue.FORWARD_INDEX)
    del o, lse, o2, lse2
    gc.collect()
    assert len(glue.FORWARD_INDEX) == before - 2
    with torch.inference_mode():
        torch.ops.fsagen.slc_fwd(q, k, v, idx, *args)
    assert len(glue.FORWARD_INDEX) == before - 2

    monkeypatch.setenv("FSAGEN_KEEP_INDEX", "0")  # memory back, the backward sorts again
    builds.clear()
    o, lse = torch.ops.fsagen.slc_fwd(q, k, v, idx, *args)
    torch.ops.fsagen.slc_bwd(do, q, k, v, o, lse, idx, *args)
    assert len(builds) == 2 and len(glue.FORWARD_INDEX) == before - 2
    monkeypatch.setenv("FSAGEN_KEEP_INDEX", "yes")
    with pytest.raises(ValueError, match="FSAGEN_KEEP_INDEX must be 0 or 1"):
        torch.ops.fsagen.slc_fwd(q, k, v, idx, *args)


@pytest.mark.parametrize("tokens,keys", [(3, 0), (8, 16), (31, 0)])
def test_q_outer_forward_over_token_tiles_on_cpu(tokens, keys, edited_schedule):
    """q_outer's forward with ``tokens`` tokens a CTA over the union of their blocks (knob
    q_tokens; ``q_fwd_plan`` dedupes them): equals the float64 reference on varlen sequences whose
    boundaries fall inside tiles (3 tokens a tile), with -1 slots and blocks after their token; and
    with 8 tokens a tile (16 rows at G = 2) stepping through each block in 16-key halves; and 31
    tokens (the most: a bit each in an int32)."""
    edited_schedule("cpu", "q_tokens = 1", f"q_tokens = {tokens}")
    if keys:
        edited_schedule("cpu", "q_keys = 0", f"q_keys = {keys}")
    spec = _spec("slc", "fwd", BF16, block_size=SLC_BS, topk=SLC_TOPK)
    plan = load_schedule("cpu").plan(spec, loop_order="q_outer")
    assert plan.knob("q_tokens") == tokens and plan.knob("q_keys") == keys
    test_selected_attention_on_cpu("q_outer")


@pytest.mark.parametrize("per_item,query_chunk,h_lo", [(1, 0, 0), (3, 100, 1), (16, 1, 0), (512, 4096, 1)])
def test_block_index_kernels_equal_torch_on_cpu(per_item, query_chunk, h_lo):
    """The block index built by the plan's index stages (fsagen/kernels/block_index.py) equals the
    torch formulation element for element: work items (empty ones too), query tokens, slots; with
    -1 holes, blocks after the query's own, several sequences, query chunks and a kv-head offset."""
    from fsagen import slc as glue
    from fsagen.slc_index import build_block_index, build_block_index_torch, token_layout

    gen = _gen()
    cu = random_cu_seqlens(700, 4, block_size=SLC_BS, generator=gen)
    n = int(cu[-1])
    idx = random_topk_idx(cu, HKV, SLC_TOPK, SLC_BS, generator=gen)
    idx = torch.where(torch.rand(idx.shape, generator=gen) < 0.2, torch.full_like(idx, -1), idx)
    q, k = _randn(gen, n, HKV * G, D, dtype=BF16), _randn(gen, n, HKV, D, dtype=BF16)
    kern, _ = glue._kernel(q, k, idx, SLC_BS, "fwd", "kv_outer")
    layout = token_layout(cu, n, SLC_BS)
    got = build_block_index(idx[h_lo:], layout, SLC_BS, h_lo, per_item, query_chunk, kern)
    want = build_block_index_torch(idx[h_lo:], layout, SLC_BS, h_lo, per_item, query_chunk)
    for name in ("items", "ent_q", "ent_k"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert int((got.items[:, 3] - got.items[:, 2]).sum()) == int((idx[h_lo:] >= 0).sum()) - int(
        (idx[h_lo:] > (layout.tok_pos // SLC_BS)[None, :, None]).sum())


def test_layer_host_ops_on_cpu():
    """Host work of one NSA layer forward + backward (fsagen.nsa_attention, the CPU kernels), counted
    as top-level aten ops in the profiler: each is a launch on a GPU, and at short sequences the
    launches, not the GPU, set the pace. After a first call on the same cu_seqlens (its tile tables,
    token layout and compressed offsets then come from fsagen.seqlens_cache) the layer stays within
    a budget (bench/results/host_ops_cpu.md has the counts with and without) and slc's forward
    issues fewer than 30 (104 with the index as torch ops). Nor does such a call read a tensor value
    on the host (a sync that would stop the host from running ahead of the GPU; compression's count
    of compressed tokens is kept too)."""
    import collections

    from fsagen.testing import count_host_work

    gen = _gen()
    n = 512
    cu = torch.tensor([0, 300, n], dtype=torch.int32)
    q, k, v = (_randn(gen, n, h, D, dtype=BF16).requires_grad_() for h in (HKV * G, HKV, HKV))
    gates = torch.rand(n, HKV * G, 3, generator=gen).to(BF16).requires_grad_()
    kw = dict(kernel_size=KS, stride=STRIDE, block_size=SLC_BS, topk=SLC_TOPK, init_blocks=1, local_blocks=2,
              window_size=64, check_values=False)
    fsagen.nsa_attention(q, k, v, gates, cu, **kw).sum().backward()
    ops, reads = count_host_work(lambda: fsagen.nsa_attention(q, k, v, gates, cu, **kw).sum().backward())
    per_op = collections.Counter(ops)
    assert 50 < len(ops) <= 150 and 0 < per_op["fsagen::slc_fwd"] < 30 and reads == 0, (per_op, reads)


@pytest.mark.parametrize("loop_order,edits", [
    ("q_outer", [("q_tokens = 1", "q_tokens = 4")]),  # token tiles (union of blocks)
    ("kv_outer", []),  # the block index's programs
])
def test_slc_edge_layouts_on_cpu(loop_order, edits, edited_schedule):
    """Layouts at the edges, through the generated programs: sequences of 1 and 2 tokens, a batch
    shorter than one 4-token tile at its end, a token whose row is all -1, a row whose only
    selection is a block after its own (dropped), an empty sequence."""
    for old, new in edits:
        edited_schedule("cpu", old, new)
    gen = _gen()
    cu = torch.tensor([0, 1, 3, 3, 40, 75, 77], dtype=torch.int32)
    n = int(cu[-1])
    idx = random_topk_idx(cu, HKV, SLC_TOPK, SLC_BS, generator=gen)
    idx[:, 5] = -1  # all -1: sees nothing (o = 0, lse = -inf)
    idx[0, 10] = torch.tensor([1, -1, -1, -1], dtype=idx.dtype)  # token 10 (position 7 of its sequence): block 1 is ahead
    q, k, v = (_randn(gen, n, h, D, dtype=BF16).requires_grad_() for h in (HKV * G, HKV, HKV))
    o, lse = fsagen.selected_attention(q, k, v, idx, SLC_BS, cu, return_lse=True, loop_order=loop_order,
                                       check_indices=False)
    do = _randn(gen, n, HKV * G, D, dtype=BF16)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ro, rl, *rgrads = _reference(q, k, v, idx, cu, SLC_BS, do)
    assert torch.isinf(lse[5]).all() and not o[5].any()
    _compare(o.detach(), lse, grads, ro, rl, rgrads, BF16, f"{loop_order} edges", "slc-cpu")
