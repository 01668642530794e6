"""Graceful under CPU load: the engine runs one thread fewer per core that other processes keep busy (the
speed-up itself is measured by eval/contention.py, not here)."""
import multiprocessing as mp
import time

import numpy as np
import pytest
import torch

from hybrid.model.config import RunConfig
from hybrid.kernels.cpu_experts import CpuExperts, pointer_table
from hybrid.kernels.cpu_load import CoreWatch, core_watch, threads_for, usable_cpus
from hybrid.engine.engine import Engine
from hybrid.engine.sampling import SamplingParams


def spin(stop) -> None:
    while not stop.is_set():
        for _ in range(100_000):
            pass


@pytest.fixture
def one_busy_core():
    stop = mp.Event()
    proc = mp.Process(target=spin, args=(stop,), daemon=True)
    proc.start()
    time.sleep(0.8)                                    # a few samples of the watch
    yield
    stop.set()
    proc.join()


def test_threads_leave_busy_cores_to_others():
    assert threads_for(cores=2, others=0.0, most=2) == 2
    assert threads_for(cores=2, others=0.3, most=2) == 2           # a light load keeps the team
    assert threads_for(cores=2, others=0.9, most=2) == 1
    assert threads_for(cores=2, others=2.0, most=2) == 1           # never below one
    assert threads_for(cores=16, others=1.0, most=15) == 15        # a spare core absorbs it
    assert threads_for(cores=16, others=2.2, most=15) == 14


def test_the_watch_sees_a_busy_process(one_busy_core):
    watch = CoreWatch(interval_s=0.1)
    time.sleep(0.5)
    assert watch.others >= 0.6                         # one core's worth, or more where others run too


def test_the_watch_subtracts_this_process_time():
    watch = CoreWatch(start=False)
    t, busy, mine = watch._last
    watch.update((t + 1.0, busy + 1.5, mine + 0.5))   # 1.5 core-seconds busy in 1 s, 0.5 of them ours
    assert watch.others == pytest.approx(1.0)
    watch.update((t + 2.0, busy + 2.4, mine + 1.4))   # all of the next second's 0.9 was ours
    assert watch.others == pytest.approx(0.0, abs=1e-9)          # /proc counters are large: absolute slack
    t0, busy0, mine0 = CoreWatch(start=False)._last
    spin_until = time.time() + 0.3
    while time.time() < spin_until:                    # this process busy: its own time is counted as its own
        pass
    t1, busy1, mine1 = CoreWatch(start=False)._last
    assert mine1 - mine0 >= 0.2


@pytest.mark.skipif(len(usable_cpus()) < 2, reason="needs two cores to give one away")
@pytest.mark.parametrize("mode", ["gpu", "hybrid"])
def test_engine_gives_a_busy_core_away_and_takes_it_back(tiny, mode, one_busy_core):
    cores = len(usable_cpus())
    e = Engine(str(tiny), RunConfig(dtype="float32", mode=mode, cpu_threads=cores), progress=False)
    watch = core_watch()
    time.sleep(0.5)
    e.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))
    assert e.threads == threads_for(cores, watch.others, cores) == cores - 1 == torch.get_num_threads()


def test_pool_members_sit_out_and_results_stay_equal():
    from test_cpu_kernel import experts
    inline = CpuExperts("native", tiles="off")
    pooled = CpuExperts("native", pool_threads=3, tiles="off")
    _, w13, w2, starts, counts = experts([2, 1, 3], torch.float32)
    views = list(zip(w13, w2))
    segs = [(j, a, c) for j, (a, c) in enumerate(zip(starts, counts))]
    x, rows = torch.randn(6, 64), np.arange(6, dtype=np.int32)
    ref = torch.empty(6, 64)
    inline.run_rows(x, rows, ref, views, pointer_table(views), segs, torch.empty(6, 64))
    try:
        for members in (1, 2, 3):
            pooled.lib.moe_pool_limit(members)
            out = torch.full((6, 64), float("nan"))
            assert pooled.start_rows(x, rows, out, views, pointer_table(views), segs)
            pooled.wait()
            assert torch.equal(out, ref)
    finally:
        pooled.lib.moe_pool_limit(1 << 30)


def test_a_gpu_machines_lane_keeps_a_core_for_the_driving_thread():
    from hybrid.kernels.cpu_load import default_threads
    from hybrid.offload.lanes import CpuLane
    cores = len(usable_cpus())
    lane = CpuLane(None, cuda=True, kernel="native")
    assert lane.threads == default_threads(True) == max(1, cores - 1) == torch.get_num_threads()
    assert lane.experts.pool_threads == lane.members(lane.threads) == max(1, lane.threads - 1)
    assert default_threads(False) == cores


def nice_spin(stop) -> None:
    import os
    os.nice(19)
    spin(stop)


def others_with(target) -> float:
    """What the watch sees while `target` spins a core in another process."""
    stop = mp.Event()
    proc = mp.Process(target=target, args=(stop,), daemon=True)
    proc.start()
    try:
        watch = CoreWatch(interval_s=0.1)
        time.sleep(0.6)
        return watch.others
    finally:
        stop.set()
        proc.join()


def test_a_niced_neighbour_keeps_its_core_ours():
    assert others_with(spin) - others_with(nice_spin) >= 0.5       # the niced one's time is not counted
