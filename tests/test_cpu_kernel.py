"""The native CPU-expert kernel: built here (CI has a compiler), equal to torch's path, and a clean fallback.

Every machine runs every path: the vector path (forced with tiles="off" where the CPU has AMX), the tile path
(emulated where it has none; AMX itself where it has), and a second build for a baseline target without AVX-512
or AMX, whose vector path has the narrower vectors and register tiles of such CPUs."""
import platform

import pytest
import torch

from hybrid.kernels import cpu_kernel
from hybrid.kernels.cpu_experts import CpuExperts, torch_experts

BASELINE = "x86-64-v2" if platform.machine() in ("x86_64", "AMD64") else "armv8-a"
BUILDS = [("native", "off"), ("native", "emulate"), ("native", "auto"), (BASELINE, "off"), (BASELINE, "emulate")]


def experts(counts, dtype, hidden=64, inter=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = [(torch.randn(2 * inter, hidden, generator=g) * 0.1).to(dtype) for _ in counts]
    w2 = [(torch.randn(hidden, inter, generator=g) * 0.1).to(dtype) for _ in counts]
    x = torch.randn(sum(counts), hidden, generator=g).to(dtype)
    starts = [sum(counts[:j]) for j in range(len(counts))]
    return x, w13, w2, starts, list(counts)


@pytest.mark.parametrize("march,tiles", BUILDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("counts", [[1], [1, 2, 3, 4, 5], [7, 1, 12, 3]])
def test_native_kernel_matches_torch(dtype, tol, counts, march, tiles):
    native = CpuExperts("native", max_tokens=8, tiles=tiles, march=march)
    assert native.kind == "native" and native.lib.moe_cpu_threads() == torch.get_num_threads()
    x, w13, w2, starts, counts = experts(counts, dtype)
    ref, out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    torch_experts(x, ref, w13, w2, starts, counts)
    native.run(x, out, w13, w2, starts, counts)            # counts above 8 take torch's path inside the call
    assert torch.isfinite(out).all()
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() <= tol


def test_native_kernel_covers_a_row_subset_only():
    x, w13, w2, starts, counts = experts([2, 3], torch.float32)
    out = torch.full_like(x, 7.0)
    CpuExperts("native").run(x, out, w13[1:], w2[1:], starts[1:], counts[1:])
    assert (out[:2] == 7.0).all() and not (out[2:] == 7.0).any()


def test_missing_compiler_falls_back_or_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "COMPILER", str(tmp_path / "no-such-compiler"))
    auto = CpuExperts("auto")
    assert auto.kind == "torch" and "no-such-compiler" in auto.why
    x, w13, w2, starts, counts = experts([2, 1], torch.float32)
    out, ref = torch.empty_like(x), torch.empty_like(x)
    auto.run(x, out, w13, w2, starts, counts)
    torch_experts(x, ref, w13, w2, starts, counts)
    assert torch.equal(out, ref)
    with pytest.raises(cpu_kernel.KernelUnavailable, match="no-such-compiler"):
        CpuExperts("native")
    with pytest.raises(ValueError, match="unknown CPU expert kernel"):
        CpuExperts("fast")


def test_build_is_keyed_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path))
    path = cpu_kernel.library_path()
    assert path.parent == tmp_path / "kernels" and not path.exists()
    cpu_kernel.load()
    assert path.exists() and [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("counts", [[1, 2, 1], [1, 6, 2]])         # 6 > max_tokens: the torch path gathers
def test_run_rows_reads_inputs_through_the_row_map(counts):
    import numpy as np
    from hybrid.kernels.cpu_experts import pointer_table
    _, w13, w2, starts, counts = experts(counts, torch.float32)
    x = torch.randn(5, 64)                                           # 5 tokens in token order
    rows = np.random.default_rng(0).integers(0, 5, sum(counts)).astype(np.int64)
    views = list(zip(w13, w2))
    segs = [(j, a, c) for j, (a, c) in enumerate(zip(starts, counts))]
    out, ref = torch.empty(sum(counts), 64), torch.empty(sum(counts), 64)
    k = CpuExperts("native", max_tokens=4)
    k.run_rows(x, rows, out, views, pointer_table(views), segs, torch.empty(sum(counts), 64))
    torch_experts(x[torch.from_numpy(rows)], ref, w13, w2, starts, counts)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


def test_auto_tiles_follow_the_hardware_and_the_baseline_build_has_none():
    auto, off = CpuExperts("native"), CpuExperts("native", tiles="off")
    hw = auto.lib.moe_tiles()
    dot = "+dot" if auto.lib.moe_dot() else ""
    assert auto.tiles == hw and auto.label == "native" + ("+amx" if hw else "") + dot
    assert off.tiles == 0 and off.label == "native" + dot
    assert CpuExperts("native", march=BASELINE).tiles == 0


@pytest.mark.parametrize("march", ["native", BASELINE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("join_above", [0, 1 << 30])
def test_pool_runs_the_same_kernel_asynchronously(dtype, march, join_above):
    """Whether the waiting thread joins the job (a CPU machine; a GPU machine's larger jobs) or only watches it
    finish (a GPU machine's decode jobs), the pool's result is the inline kernel's, bit for bit."""
    inline = CpuExperts("native", tiles="off", march=march)
    pooled = CpuExperts("native", pool_threads=3, tiles="off", march=march)
    assert pooled.label.startswith("native+pool") and inline.label in ("native", "native+dot")
    before = pooled.lib.moe_pool_join_above(join_above)
    try:
        _check_pool_jobs(inline, pooled, dtype)
    finally:
        assert pooled.lib.moe_pool_join_above(before) == join_above
    assert inline.lib.moe_pool_threads() >= 1          # one pool per process, sized by its first user


def test_a_gpu_machines_driving_thread_joins_prefill_jobs_and_watches_decode_ones():
    from hybrid.offload.lanes import NEVER, CpuLane
    threads = torch.get_num_threads()
    try:
        for cuda in (True, False):
            lane = CpuLane(threads=2, cuda=cuda, tiles="off")
            told = []
            for prefill in (False, False, True, False):
                lane.join(prefill)
                told.append(lane.experts.lib.moe_pool_join_above(0))       # what the pool holds (then reset)
                lane.joins = True
            assert told == ([NEVER, NEVER, 0, NEVER] if cuda else [0, 0, 0, 0])
    finally:
        torch.set_num_threads(threads)


def _check_pool_jobs(inline, pooled, dtype):
    import numpy as np
    from hybrid.kernels.cpu_experts import pointer_table
    for seed, counts in enumerate([[1, 2, 1], [4, 1], [3, 3, 2, 1]]):          # the pool is reused job after job
        _, w13, w2, starts, counts = experts(counts, dtype, seed=seed)
        views = list(zip(w13, w2))
        segs = [(j, a, c) for j, (a, c) in enumerate(zip(starts, counts))]
        x = torch.randn(6, 64).to(dtype)
        rows = np.random.default_rng(seed).integers(0, 6, sum(counts)).astype(np.int32)
        ref, out = torch.empty(sum(counts), 64, dtype=dtype), torch.full((sum(counts), 64), float("nan"), dtype=dtype)
        inline.run_rows(x, rows, ref, views, pointer_table(views), segs, torch.empty(sum(counts), 64, dtype=dtype))
        if seed == 1:
            pooled.lib.moe_pool_park()                # idle members asleep: the next job wakes them
        assert pooled.start_rows(x, rows, out, views, pointer_table(views), segs)
        assert pooled.wait() > 0
        assert torch.equal(out, ref)                  # same rows, same sums: bit for bit, whatever the split


def test_a_jobs_time_ends_with_its_last_item_not_with_the_callers_return():
    """The lane's time feeds the planner's CPU-cost correction: a caller that comes back late (prefill's launches)
    must not make the lane look slower than it ran."""
    import time

    import numpy as np
    from hybrid.kernels.cpu_experts import pointer_table
    _, w13, w2, starts, counts = experts([2, 1], torch.float32)
    views, x = list(zip(w13, w2)), torch.randn(3, 64)
    pooled = CpuExperts("native", pool_threads=2, tiles="off")
    segs, rows = [(0, 0, 2), (1, 2, 1)], np.array([0, 1, 2], dtype=np.int32)
    assert pooled.start_rows(x, rows, torch.empty(3, 64), views, pointer_table(views), segs)
    time.sleep(0.3)                                   # the members finish meanwhile
    ms = pooled.wait()
    assert 0 < ms < 150


def test_call_arrays_grow_and_a_started_job_holds_them():
    import numpy as np
    from hybrid.kernels.cpu_experts import CallArrays, pointer_table
    a = CallArrays(experts=2, rows=3)
    ptrs = np.arange(10, dtype=np.int64).reshape(5, 2)
    addr = a.fill(ptrs, [0, 1, 2, 3, 4], [1, 1, 1, 1, 1], np.arange(5, dtype=np.int32))
    assert a.w13[:5].tolist() == [0, 2, 4, 6, 8] and a.w2[:5].tolist() == [1, 3, 5, 7, 9]
    assert a.xr[:5].tolist() == [0, 1, 2, 3, 4] and addr[0] == a.w13.ctypes.data and addr[4] == a.xr.ctypes.data
    assert a.fill(ptrs[:1], [0], [2], None)[4] is None and a.ct[0] == 2
    _, w13, w2, starts, counts = experts([1, 2], torch.float32)
    views, x, out = list(zip(w13, w2)), torch.randn(2, 64), torch.empty(3, 64)
    pooled = CpuExperts("native", pool_threads=2, tiles="off")
    segs, rows = [(0, 0, 1), (1, 1, 2)], np.array([1, 0, 1], dtype=np.int32)
    assert pooled.start_rows(x, rows, out, views, pointer_table(views), segs)
    with pytest.raises(RuntimeError, match="still running"):      # its arrays are the running job's
        pooled.start_rows(x, rows, out, views, pointer_table(views), segs)
    pooled.wait()
    ref = torch.empty(3, 64)
    CpuExperts("native", tiles="off").run_rows(x, rows, ref, views, pointer_table(views), segs, torch.empty(3, 64))
    assert torch.equal(out, ref)


def test_start_rows_declines_what_the_pool_cannot_take():
    import numpy as np
    from hybrid.kernels.cpu_experts import pointer_table
    _, w13, w2, starts, counts = experts([2, 5], torch.float32)
    views, x, out = list(zip(w13, w2)), torch.randn(3, 64), torch.empty(7, 64)
    segs, rows = [(0, 0, 2), (1, 2, 5)], np.zeros(7, dtype=np.int32)
    assert not CpuExperts("native", max_tokens=4, pool_threads=2).start_rows(x, rows, out, views,
                                                                             pointer_table(views), segs)
    assert not CpuExperts("native", max_tokens=8).start_rows(x, rows, out, views, pointer_table(views), segs)


@pytest.mark.parametrize("counts", [[17], [1, 17, 9, 40], [33, 2, 16]])     # 1-3 blocks of 16 tokens, odd and even
def test_tile_path_matches_torch(counts):
    """The tile path (AMX where the CPU has it; here its emulation, which runs everywhere) against torch's bf16."""
    tiles = CpuExperts("native", max_tokens=8, tiles="emulate")
    assert tiles.label.startswith("native+amxemu")
    x, w13, w2, starts, counts = experts(counts, torch.bfloat16)
    ref, out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    torch_experts(x, ref, w13, w2, starts, counts)
    tiles.run(x, out, w13, w2, starts, counts)
    assert torch.isfinite(out).all()
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() <= 1e-2


def test_tile_prefetch_changes_no_result():
    """The tile path's software prefetch of the next weight rows (on by default, off for A/B runs) only moves
    bytes into the cache: outputs are bitwise the same either way."""
    tiles = CpuExperts("native", max_tokens=8, tiles="emulate")
    x, w13, w2, starts, counts = experts([17, 40, 3, 33], torch.bfloat16)
    outs = []
    try:
        for on in (1, 0):
            tiles.lib.moe_set_prefetch(on)
            out = torch.full_like(x, float("nan"))
            tiles.run(x, out, w13, w2, starts, counts)
            outs.append(out)
    finally:
        tiles.lib.moe_set_prefetch(1)
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


def test_tile_path_on_the_pool_reads_through_the_row_map():
    import numpy as np
    from hybrid.kernels.cpu_experts import pointer_table
    inline = CpuExperts("native", tiles="emulate")
    pooled = CpuExperts("native", pool_threads=3, tiles="emulate")
    for seed, counts in enumerate([[20, 3, 1], [9, 40]]):
        _, w13, w2, starts, counts = experts(counts, torch.bfloat16, seed=seed)
        views = list(zip(w13, w2))
        segs = [(j, a, c) for j, (a, c) in enumerate(zip(starts, counts))]
        x = torch.randn(24, 64).to(torch.bfloat16)
        rows = np.random.default_rng(seed).integers(0, 24, sum(counts)).astype(np.int32)
        n = sum(counts)
        ref, out = torch.empty(n, 64, dtype=torch.bfloat16), torch.full((n, 64), float("nan"), dtype=torch.bfloat16)
        inline.run_rows(x, rows, ref, views, pointer_table(views), segs, torch.empty(n, 64, dtype=torch.bfloat16))
        assert pooled.start_rows(x, rows, out, views, pointer_table(views), segs)   # > 8 tokens: tiles take it
        pooled.wait()
        assert torch.equal(out, ref)
        torch_ref = torch.empty_like(ref)
        torch_experts(x[torch.from_numpy(rows).long()], torch_ref, w13, w2, starts, counts)
        assert ((out.float() - torch_ref.float()).norm() / torch_ref.float().norm()).item() <= 1e-2


def test_tile_path_only_where_it_applies():
    _, w13, w2, starts, counts = experts([12, 2], torch.float32)
    tiles = CpuExperts("native", max_tokens=8, tiles="emulate")
    assert tiles._mode(torch.empty(1, 64), 32, counts) is None              # fp32: torch's path for big experts
    assert tiles._mode(torch.empty(1, 64, dtype=torch.bfloat16), 32, counts) == 2
    assert tiles._mode(torch.empty(1, 64, dtype=torch.bfloat16), 32, [2, 3]) == 0   # decode sizes: vector path
    assert tiles._mode(torch.empty(1, 48, dtype=torch.bfloat16), 32, counts) is None  # 48 % 32: no tiles
    assert CpuExperts("native", tiles="off").tiles == 0
    with pytest.raises(ValueError, match="unknown tile setting"):
        CpuExperts("native", tiles="fast")


@pytest.mark.parametrize("dot", ["off", "emulate", "auto"])
@pytest.mark.parametrize("counts", [[1], [1, 2, 3, 4, 5], [6, 1]])
def test_dot_path_matches_torch_and_the_plain_path(dot, counts):
    """bf16 experts on the pair dot product (AVX512-BF16 where the CPU has it under "auto"; its emulation runs
    everywhere) against torch's bf16, and its pool run against its inline run bit for bit."""
    import numpy as np
    from hybrid.kernels.cpu_experts import pointer_table
    k = CpuExperts("native", tiles="off", dot=dot)
    pooled = CpuExperts("native", tiles="off", dot=dot, pool_threads=3)
    assert k.dot == {"off": 0, "emulate": 2, "auto": k.lib.moe_dot()}[dot]
    x, w13, w2, starts, counts = experts(counts, torch.bfloat16, hidden=256, inter=128)
    ref, out = torch.empty_like(x), torch.full_like(x, float("nan"))
    torch_experts(x, ref, w13, w2, starts, counts)
    k.run(x, out, w13, w2, starts, counts)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= 1e-2
    views = list(zip(w13, w2))
    segs = [(j, a, c) for j, (a, c) in enumerate(zip(starts, counts))]
    rows = np.arange(sum(counts), dtype=np.int32)[::-1].copy()
    inline, pool_out = torch.empty_like(x), torch.full_like(x, float("nan"))
    k.run_rows(x, rows, inline, views, pointer_table(views), segs, torch.empty_like(x))
    assert pooled.start_rows(x, rows, pool_out, views, pointer_table(views), segs)
    pooled.wait()
    assert torch.equal(pool_out, inline)


def test_dot_path_setting_is_checked():
    with pytest.raises(ValueError, match="unknown dot setting"):
        CpuExperts("native", dot="fast")
    assert CpuExperts("native", dot="emulate").label.endswith("+dotemu")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
