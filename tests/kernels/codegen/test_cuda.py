"""CUDA backend: GPU rules, lowering checked by simulating a grid of threads, nvcc compiles.

Without a GPU, two things still catch most mistakes: a simulator that runs the
GPU-lowered IR block by block, its threads in lock step between barriers (so a
missing ``__syncthreads``, a barrier not reached by every thread, a race on shared
memory or an output written twice shows up, as well as a wrong result), and nvcc,
which compiles every generated kernel (skipped where nvcc is absent). Tests that
need a GPU skip unless CuPy sees one.
"""

from __future__ import annotations

import dataclasses

import itertools
import json
import random
import re
import shutil
import subprocess

import numpy as np
import pytest

from kernels.ir import lower as ir
from kernels.ir.dtypes import decode
from kernels.ir.printer import print_loop_nest
from tests.conftest import eval_value, loop_range
from kernels.codegen.rules import WGMMA_ARCH, check_for_target, default_schedule, launch_config
from kernels.experts import expert_schedule
from kernels.ir.ops import OPERATORS, make_op
from kernels.codegen import render
from kernels.measure import Candidate
from kernels.ir.schedule import Bind, DoubleBuffer, Schedule, ScheduleError, bound_axis, footprint
from kernels.target import NoCudaDevice, cuda_target_for_compile, get_target

TARGET = cuda_target_for_compile("sm_90")
NVCC = shutil.which("nvcc")


# ---------------------------------------------------------------- a GPU simulator

class GpuFault(AssertionError):
    pass


# The fragments of mma.sync as the PTX ISA documents them (per element i of a thread's
# fragment, g = lane / 4, t = lane % 4), written out independently of kernels.ir.mma.
def ptx_a(i: int, g: int, t: int, k: int) -> tuple[int, int]:
    if k == 16:   # m16n8k16, a0..a7
        return g + 8 * ((i // 2) % 2), 2 * t + i % 2 + 8 * (i // 4)
    return g + 8 * (i % 2), t + 4 * (i // 2)       # m16n8k8 tf32, a0..a3


def ptx_b(i: int, g: int, t: int, k: int) -> tuple[int, int]:
    if k == 16:   # b0..b3
        return 2 * t + i % 2 + 8 * (i // 2), g
    return t + 4 * i, g                              # b0, b1


def ptx_c(i: int, g: int, t: int) -> tuple[int, int]:
    return g + 8 * (i // 2), 2 * t + i % 2         # c0..c3


class MmaCall:
    """A thread at an ``mma.sync``: its fragments, and where its accumulators are."""

    def __init__(self, stmt, a, b, acc, base):
        self.stmt, self.a, self.b, self.acc, self.base = stmt, a, b, acc, base


def warp_mma(calls: list[MmaCall]) -> None:
    """Execute one instruction for a warp of 32 threads, as the hardware would."""
    k = 16 if len(calls[0].a) == 8 else 8
    a, b = np.full((16, k), np.nan), np.full((k, 8), np.nan)
    for lane, c in enumerate(calls):
        g, t = lane // 4, lane % 4
        for i, x in enumerate(c.a):
            a[ptx_a(i, g, t, k)] = x
        for i, x in enumerate(c.b):
            b[ptx_b(i, g, t, k)] = x
    if np.isnan(a).any() or np.isnan(b).any():
        raise GpuFault("an mma fragment element was read unset")
    d = a @ b
    for lane, c in enumerate(calls):
        for i in range(4):
            c.acc[c.base + i] += d[ptx_c(i, lane // 4, lane % 4)]


def wgmma_tiles(shared: dict, s: "ir.Wgmma", env: dict) -> tuple[np.ndarray, np.ndarray]:
    """The 64 x k tile of A and the k x n tile of B that a ``wgmma`` reads (k = 16, 8 for
    tf32), as its descriptors declare them (PTX ISA, "Shared Memory Matrix Layout",
    128-byte swizzle): A's rows 128 bytes apart; a 16-bit B read transposed, 64-column
    blocks ``b_block`` bytes apart, its rows 128 bytes apart; a tf32 B K-major like A, one
    128-byte row per column. The swizzle permutes the addresses of writes and reads
    alike, so it is left out here."""
    (a, ai), (b, bi) = wgmma_reads(s, env)
    return shared[a][ai].copy(), shared[b][bi].copy()


def wgmma_reads(s: "ir.Wgmma", env: dict) -> tuple[tuple[str, np.ndarray], tuple[str, np.ndarray]]:
    """(buffer, indices) of the A and B tiles a ``wgmma`` reads (see :func:`wgmma_tiles`)."""
    (a, ai), (b, bi) = ((name, i.evaluate(env)) for name, i in (s.a, s.b))
    k, row = (8, 32) if s.dtype == "tf32" else (16, 64)   # the instruction's k; elements in 128 bytes
    rows, cols = np.arange(64)[:, None], np.arange(k)[None, :]
    ks, ns = np.arange(k)[:, None], np.arange(s.n)[None, :]
    if s.dtype == "tf32":
        return (a, ai + rows * row + cols), (b, bi + ns * row + ks)
    return (a, ai + rows * row + cols), (b, bi + (ns // 64) * (s.b_block // 2) + ks * 64 + ns % 64)


def simulate(fn: ir.Function, launch, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Run GPU-lowered ``fn`` on every thread of ``launch``; returns the output (flat).

    Threads of a block run one after another up to the next barrier, then the next
    epoch starts; within an epoch, a shared element written by one thread and touched
    by another is a race. Every output element must be written exactly once.
    """
    glob = {name: np.asarray(a, np.float64).reshape(-1).copy() for name, a in arrays.items()}
    out_name = fn.params[-1].name
    writes = np.zeros(glob[out_name].size, int)
    (gx, gy, gz), (bx, by, bz) = launch

    def bound_vars(stmts) -> dict[str, str]:
        out = {}
        for s in stmts:
            if isinstance(s, ir.For) and s.kind.startswith("bind:"):
                out[s.var] = s.kind[5:]
            if isinstance(s, (ir.For, ir.If)):
                out.update(bound_vars(s.body))
        return out

    bound = bound_vars(fn.body)

    def has_mma(stmts) -> bool:
        return any(isinstance(x, (ir.Mma, ir.Wgmma)) or isinstance(x, (ir.For, ir.If)) and has_mma(x.body)
                   for x in stmts)

    warps = has_mma(fn.body)   # a tensorized kernel: threadIdx.x counts lanes of warps

    def thread(env0: dict, tid: int, shared: dict, log: dict):
        local: dict[str, np.ndarray] = {}

        def buffer(name):
            return local.get(name, shared.get(name, glob.get(name)))

        def at(name, index, env, write):
            i = index.evaluate(env)
            buf = buffer(name)
            if not 0 <= i < buf.size:
                raise GpuFault(f"{'write' if write else 'read'} {name}[{i}] outside [0, {buf.size}) at {env}")
            if name in shared:
                if write:
                    if log["w"].setdefault((name, i), tid) != tid:
                        raise GpuFault(f"race: threads {log['w'][(name, i)]} and {tid} write {name}[{i}]")
                else:
                    log["r"].append((name, i, tid))
            return i

        def read(name, index, env):
            x = buffer(name)[at(name, index, env, False)]
            if np.isnan(x):
                raise GpuFault(f"read of unset {name} at {env}")
            return x

        def value(v, env):
            return eval_value(v, env, read)

        def run(stmts, env):
            for s in stmts:
                if isinstance(s, ir.For):
                    if s.kind.startswith("bind:"):
                        v = env[s.var]
                        assert v < s.extent
                        if v in loop_range(s, env):
                            yield from run(s.body, {**env, s.var: v})
                    else:
                        for v in loop_range(s, env):
                            yield from run(s.body, {**env, s.var: v})
                elif isinstance(s, ir.If):
                    if all(e.evaluate(env) < n for e, n in s.conds):
                        yield from run(s.body, env)
                elif isinstance(s, ir.Alloc):
                    if s.scope == "fragment":
                        local[s.buffer] = [None] * s.size   # unset: reading one fails
                    elif s.scope == "shared":
                        shared.setdefault(s.buffer, np.full(s.size, np.nan))
                    else:
                        local[s.buffer] = np.full(s.size, np.nan)
                elif isinstance(s, ir.Store) and s.copy_async:   # lands at a later Wait
                    in_flight[-1].append((s.buffer, at(s.buffer, s.index, env, True), value(s.value, env)))
                    log["copying"].add(in_flight[-1][-1][:2])
                elif isinstance(s, ir.StorePair):
                    for h, v in enumerate((s.lo, s.hi)):
                        i = at(s.buffer, s.index + h, env, True)
                        buffer(s.buffer)[i] = value(v, env)
                        writes[i] += s.buffer == out_name
                elif isinstance(s, ir.Wgmma):   # reads shared memory until its wait: kept to compare then
                    wgmma[-1].append((s, dict(env), wgmma_tiles(shared, s, env)))
                elif isinstance(s, ir.WgmmaCommit):
                    wgmma.append([])
                elif isinstance(s, ir.WgmmaWait):   # the older groups complete: each thread takes its part
                    while len(wgmma) > s.pending + 1:
                        for w, w_env, tiles in wgmma.pop(0):
                            a, b = wgmma_tiles(shared, w, w_env)
                            if any((name, i) in log["copying"] for name, idx in wgmma_reads(w, w_env)
                                   for i in idx.ravel().tolist()):   # it may land any time before its wait
                                raise GpuFault("an asynchronous copy in flight overwrites what a running wgmma reads")
                            if not (np.array_equal(a, tiles[0], equal_nan=True)
                                    and np.array_equal(b, tiles[1], equal_nan=True)):
                                raise GpuFault("shared memory that a wgmma reads changed before its wait")
                            if np.isnan(a).any() or np.isnan(b).any():
                                raise GpuFault("a wgmma read unset shared memory")
                            d, acc = a @ b, buffer(w.acc)
                            lane, warp = env0["threadIdx.x"] % 32, (tid // 32) % 4
                            base = w.base.evaluate(w_env)
                            for j in range(w.n // 8):
                                for i in range(4):
                                    acc[base + 4 * j + i] += d[16 * warp + lane // 4 + 8 * (i // 2),
                                                               8 * j + 2 * (lane % 4) + i % 2]
                elif isinstance(s, ir.WgmmaFence):
                    pass
                elif isinstance(s, ir.Store):
                    i = at(s.buffer, s.index, env, True)
                    x = value(s.value, env)
                    buf = buffer(s.buffer)
                    buf[i] = buf[i] + x if s.accumulate else x
                    if s.buffer == out_name:
                        writes[i] += 1
                elif isinstance(s, ir.Sync):
                    yield s
                elif isinstance(s, ir.Commit):
                    in_flight.append([])
                elif isinstance(s, ir.Wait):   # all but the latest groups land (uncommitted copies stay)
                    while len(in_flight) > s.pending + 1:
                        for name, i, x in in_flight.pop(0):
                            buffer(name)[i] = x
                            log["copying"].discard((name, i))
                            if log["w"].setdefault((name, i), tid) != tid:
                                raise GpuFault(f"race: threads {log['w'][(name, i)]} and {tid} write {name}[{i}]")
                elif isinstance(s, ir.Fragment):   # each register as the tuple of its elements
                    i = s.index.evaluate(env)
                    for r, reg in enumerate(s.regs):
                        local[s.buffer][i + r] = tuple(value(x, env) for x in reg)
                elif isinstance(s, ir.Mma):
                    (a, ai), (b, bi) = ((name, i.evaluate(env)) for name, i in (s.a, s.b))
                    a = [x for r in range(4) for x in local[a][ai + r]]
                    b = [x for r in range(2) for x in local[b][bi + r]]
                    yield MmaCall(s, a, b, buffer(s.acc), s.base.evaluate(env))
                else:
                    raise TypeError(s)

        in_flight: list[list] = [[]]   # asynchronous copies: committed groups, then those issued since
        wgmma: list[list] = [[]]       # this thread's wgmma, likewise
        env = {var: env0[axis] for var, axis in bound.items()}   # indices known everywhere
        if warps:
            lane = env0["threadIdx.x"] % 32
            env.update({v: env0[a] // 32 for v, a in bound.items() if a == "threadIdx.x"})
            env.update({ir.LANE: lane, ir.LANE_GROUP: lane // 4, ir.LANE_PLACE: lane % 4})
        return run(fn.body, env)

    for block in itertools.product(range(gz), range(gy), range(gx)):
        shared: dict[str, np.ndarray] = {}
        log: dict = {"w": {}, "r": [], "copying": set()}   # copying: issued, not yet landed
        threads = []
        for tid, t in enumerate(itertools.product(range(bz), range(by), range(bx))):
            env0 = {"blockIdx.z": block[0], "blockIdx.y": block[1], "blockIdx.x": block[2],
                    "threadIdx.z": t[0], "threadIdx.y": t[1], "threadIdx.x": t[2]}
            threads.append(thread(env0, tid, shared, log))
        while threads:
            waiting, finished = [], 0
            for g in threads:
                try:
                    waiting.append((g, next(g)))
                except StopIteration:
                    finished += 1
            if waiting and finished:
                raise GpuFault(f"block {block}: {finished} threads ended while others wait at a barrier")
            if len({id(s.stmt if isinstance(s, MmaCall) else s) for _, s in waiting}) > 1:
                raise GpuFault(f"block {block}: threads wait at different barriers or instructions")
            threads = [g for g, _ in waiting]
            if waiting and isinstance(waiting[0][1], MmaCall):   # not a barrier: races stay visible
                calls = [c for _, c in waiting]
                for w in range(0, len(calls), 32):
                    warp_mma(calls[w:w + 32])
                continue
            for name, i, tid in log["r"]:
                if log["w"].get((name, i), tid) != tid:
                    raise GpuFault(f"race: thread {tid} reads {name}[{i}] that thread {log['w'][(name, i)]} "
                                   "writes between the same barriers")
            log["w"].clear()
            log["r"].clear()
    if not (writes == 1).all():
        raise GpuFault(f"output elements written {sorted(set(writes.tolist()))} times, not once each")
    return glob[out_name]


def simulate_schedule(schedule: Schedule, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(simulated output, reference) on random inputs; checks the target's rules first."""
    if not schedule.steps:
        schedule = default_schedule(schedule.op, TARGET)
    check_for_target(schedule, TARGET)
    op = schedule.op
    inputs = op.random_inputs(np.random.default_rng(seed))
    arrays = {**{n: decode(a, op.dtype) for n, a in inputs.items()}, op.output.name: np.full(op.output.shape, np.nan)}
    out = simulate(ir.lower(schedule, gpu=True), launch_config(schedule.nest), arrays)
    return out.reshape(op.output.shape), op.reference(inputs)


def describe(schedule: Schedule) -> str:
    return json.dumps(schedule.to_json()) + "\n" + print_loop_nest(schedule, gpu=True)


# ---------------------------------------------------------------- nvcc

def nvcc_compile(sources: list[str], tmp_path, arch: str = "sm_90") -> None:
    """Compile all sources as one translation unit (one nvcc start, ~2 s); on failure,
    find the kernel that fails and show its source."""
    if arch == "sm_90" and any(WGMMA_ARCH in s.split("\n", 1)[0] for s in sources):
        arch = WGMMA_ARCH   # sm_90 and Hopper's own instructions (wgmma)
    src = tmp_path / "kernels.cu"
    src.write_text("\n".join(sources))
    gencode = f"-gencode=arch=compute_{arch[3:]},code={arch}"   # SASS of that one architecture
    proc = subprocess.run([NVCC, gencode, "-c", str(src), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 0:
        return
    for s in sources:
        src.write_text(s)
        one = subprocess.run([NVCC, gencode, "-c", str(src), "-o", str(tmp_path / "k.o")],
                             capture_output=True, text=True, timeout=600)
        assert one.returncode == 0, f"{one.stderr[:3000]}\n{s}"
    pytest.fail(proc.stderr[:3000])


needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")


# ---------------------------------------------------------------- random GPU schedules

def random_gpu_schedule(op, rng: random.Random) -> Schedule | None:
    """A random schedule that is legal on the GPU, or None when the draw failed.

    Spatial axes are split (tails often), sometimes two loops fused, and some of the
    spatial loops bound to blocks and threads; the output is cached at or inside the last bound loop; inputs are staged
    at random loops inside the block loops; loops inside get unrolled or vectorized.
    """
    s = Schedule(op)
    ext = op.extents

    def factor(n: int) -> int:
        return rng.choice([f for f in range(1, n + 1)] + [max(1, n // 2), min(n, 2), min(n, 3)])

    try:
        for a in op.axes:
            if rng.random() < 0.8 and ext[a.name] > 1:
                s = s.split(a.name, factor(ext[a.name]))
                if not a.reduce and rng.random() < 0.5:
                    s = s.split(f"{a.name}_i", factor(s.nest.loop(f"{a.name}_i").extent))
        if rng.random() < 0.3:  # fuse two neighbouring spatial loops
            loops = s.nest.loops
            pairs = [(a.name, b.name) for a, b in zip(loops, loops[1:]) if not a.reduce and not b.reduce]
            if pairs:
                s = s.fuse(*rng.choice(pairs))
    except ScheduleError:
        return None
    spatial = [l.name for l in s.nest.loops if not l.reduce]
    reduce = [l.name for l in s.nest.loops if l.reduce]
    rng.shuffle(spatial)
    blocks = spatial[:rng.randint(1, min(3, len(spatial)))]
    rest = spatial[len(blocks):]
    threads = rest[:rng.randint(0, min(3, len(rest)))]
    rest = rest[len(threads):]
    outer = [n for n in rest if rng.random() < 0.3]     # serial spatial loops around the threads
    tile = [n for n in rest if n not in outer]
    inner = tile + reduce
    rng.shuffle(inner)
    inner.sort(key=lambda n: n in tile and rng.random() < 0.5)  # some of the tile innermost
    split = rng.randint(0, len(outer))
    order = outer[:split] + blocks + outer[split:] + threads + inner
    try:
        s = s.reorder(*order)
        for n, axis in zip(blocks, rng.sample(["x", "y", "z"], len(blocks))):
            s = s.bind(n, f"blockIdx.{axis}")
        for n, axis in zip(threads, rng.sample(["x", "y", "z"], len(threads))):
            s = s.bind(n, f"threadIdx.{axis}")
        last_bound = max(s.nest.index(n) for n in blocks + threads)
        s = s.cache_write(s.nest.loops[last_bound].name)
    except ScheduleError:
        return None
    first_inner = last_bound + 1
    last_block = max(s.nest.index(n) for n in blocks)
    for tensor in (op.lhs.tensor, op.rhs.tensor):
        if rng.random() < 0.6:
            anchor = s.nest.loops[rng.randint(last_block, len(s.nest.loops) - 1)].name
            try:
                s = s.cache_read(tensor, anchor)
            except ScheduleError:
                pass
    loops = s.nest.loops
    if len(loops) > first_inner and not loops[-1].reduce and rng.random() < 0.5:
        try:
            s = s.vectorize(loops[-1].name)
        except ScheduleError:
            pass
    for l in reversed(s.nest.loops[first_inner:]):
        if rng.random() < 0.5:
            try:
                s = s.unroll(l.name)
            except ScheduleError:
                break
    try:
        check_for_target(s, TARGET)
    except ScheduleError:
        return None
    return s


def _small_shape(kind: str, rng: random.Random) -> str:
    e = lambda: rng.choice((1, 2, 3, 5, 7, 8, 12))  # noqa: E731
    if kind in ("matmul", "dense_bias_relu"):
        return f"{e()}x{e()}x{e()}"
    if kind == "batch_matmul":
        return f"{rng.choice((1, 2))}x{e()}x{e()}x{e()}"
    pad, stride = rng.choice((0, 1)), rng.choice((1, 2))
    r = rng.choice((1, 3))
    h, w = rng.choice((3, 5, 8)), rng.choice((3, 6, 9))
    c = rng.choice((1, 2, 3))
    if kind == "depthwise_conv2d":
        return f"1,{c},{h},{w},{r},{r},{stride},{pad}"
    return f"{rng.choice((1, 2))},{c},{h},{w},{rng.choice((1, 2, 4))},{r},{r},{stride},{pad}"


def random_examples(kind: str, n: int, seed: int = 1234) -> list[Schedule]:
    rng = random.Random(f"{seed}-{kind}")
    out: list[Schedule] = []
    while len(out) < n:
        s = random_gpu_schedule(make_op(kind, _small_shape(kind, rng)), rng)
        if s is not None:
            out.append(s)
    return out


EXAMPLES = 12
KINDS = list(OPERATORS)


# ---------------------------------------------------------------- the schedule IR

def test_bind_round_trips_through_json():
    op = make_op("matmul", "64x64x64")
    s = expert_schedule(op, TARGET)
    assert any(isinstance(x, Bind) for x in s.steps)
    again = Schedule.from_json(json.loads(json.dumps(s.to_json())))
    assert again.steps == s.steps and again.nest == s.nest
    assert Bind("i_o", "blockIdx.y").to_json() == {"step": "Bind", "loop": "i_o", "thread_axis": "blockIdx.y"}


@pytest.mark.parametrize("build,message", [
    (lambda s: s.bind("k", "threadIdx.x"), "reduce loop"),
    (lambda s: s.bind("i", "warp.x"), "unknown thread axis"),
    (lambda s: s.bind("i", "threadIdx.x").bind("j", "threadIdx.x"), "already bound"),
    (lambda s: s.bind("i", "threadIdx.x").bind("j", "blockIdx.x"), "inside threadIdx"),
    (lambda s: s.bind("i", "blockIdx.x").bind("j", "threadIdx.x").reorder("j", "i"), "inside threadIdx"),
    (lambda s: s.bind("i", "blockIdx.x").split("i", 2), "already marked"),
])
def test_illegal_binds_raise(build, message):
    with pytest.raises(ScheduleError, match=message):
        build(Schedule(make_op("matmul", "8x8x8")))


@pytest.mark.parametrize("build,message", [
    (lambda s: s, "no loop is bound"),
    (lambda s: s.bind("i", "blockIdx.x"), "cache_write"),
    (lambda s: s.parallel("i").bind("j", "blockIdx.x").cache_write("j"), "OpenMP"),
    (lambda s: s.bind("j", "threadIdx.x").cache_write("i"), "inside it"),
    (lambda s: s.bind("i", "blockIdx.x").bind("j", "threadIdx.x").cache_write("j")
     .cache_read("A", "i").reorder("j", "i"), None),  # illegal in the IR already
    (lambda s: s.split("i", 40).split("j", 40).reorder("i_o", "j_o", "i_i", "j_i").bind("i_o", "blockIdx.x")
     .bind("i_i", "threadIdx.y").bind("j_i", "threadIdx.x").cache_write("j_i"), "threads per block"),
    (lambda s: s.split("j", 2000).bind("i", "blockIdx.x").bind("j_i", "threadIdx.x").cache_write("j_i"),
     "threadIdx.x extent 2000"),
    (lambda s: s.bind("i", "blockIdx.y").bind("j", "blockIdx.x").cache_write("j"), "65535"),
    (lambda s: s.split("j", 500).bind("i", "blockIdx.x").bind("j_i", "threadIdx.x").cache_write("j_i")
     .cache_read("B", "i"), "shared stages take"),
    (lambda s: s.split("i", 128).split("j", 8).reorder("i_o", "j_o", "i_i", "j_i").bind("i_o", "blockIdx.x")
     .cache_write("j_o"), "tile of"),
    (lambda s: s.split("j", 32).split("k", 4).bind("i", "blockIdx.x").bind("j_o", "blockIdx.y")
     .bind("j_i", "threadIdx.x").cache_write("j_i").unroll("k_i").unroll("k_o").cache_read("B", "k_i"),
     "lies in unrolled loop 'k_o'"),
])
def test_target_rules(build, message):
    try:
        s = build(Schedule(make_op("matmul", "70000x4000x16")))
    except ScheduleError:
        assert message is None
        return
    assert message is not None
    with pytest.raises(ScheduleError, match=message):
        check_for_target(s, TARGET)


def test_binds_are_rejected_on_a_cpu(target):
    s = Schedule(make_op("matmul", "8x8x8")).bind("i", "blockIdx.x").cache_write("i")
    with pytest.raises(ScheduleError, match="cuda target"):
        render(s, target)


def test_cuda_target_without_a_gpu_is_a_clear_error():
    import importlib.util
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: get_target('cuda') may work here")
    with pytest.raises(NoCudaDevice, match="no CUDA GPU"):
        get_target("cuda")
    assert issubclass(NoCudaDevice, OSError)


def test_launch_and_source_header():
    from kernels.experts import _gpu_matmul
    op = make_op("matmul", "4096x4096x4096")
    # the expert's on the CUDA cores; the expert takes tensor cores there (3xTF32): 128 x 64 of 2 x 2 warps
    assert render(expert_schedule(op, TARGET), TARGET).launch == ((64, 32, 1), (64, 2, 1))
    k = render(_gpu_matmul(op, TARGET, False), TARGET)
    assert k.launch == ((64, 32, 1), (16, 16, 1))  # 128x64 block tiles of 8x4 thread tiles
    assert 'extern "C" __global__ void __launch_bounds__(256) matmul_4096_4096_4096(' in k.source
    assert "__shared__" in k.source and "__syncthreads();" in k.source and "float4" in k.source
    assert k.signature_json()["launch"] == {"grid": [64, 32, 1], "block": [16, 16, 1], "shared_bytes": 49152}
    # smaller products take smaller tiles, so that the multiprocessors get enough blocks
    launches = {shape: render(expert_schedule(make_op("matmul", shape), TARGET), TARGET).launch
                for shape in ("1024x1024x1024", "512x1024x512", "512x512x512", "128x128x128")}
    assert launches == {"1024x1024x1024": ((16, 16, 1), (16, 8, 1)),   # 64x64 tiles of 8x4 thread tiles
                        "512x1024x512": ((16, 16, 1), (16, 8, 1)),     # 32x64 of 4x4
                        "512x512x512": ((16, 16, 1), (8, 8, 1)),       # 32x32 of 4x4
                        "128x128x128": ((4, 4, 1), (16, 16, 1))}       # 32x32 of 2x2


def test_cpu_kernels_are_unchanged_by_the_gpu_fields(target):
    k = render(expert_schedule(make_op("matmul", "64x64x64"), target), target)
    assert k.launch is None and "launch" not in k.signature_json()
    assert "arch" not in target.to_json()


# ---------------------------------------------------------------- simulated correctness

AWKWARD = [("matmul", "1x1x1"), ("matmul", "7x13x5"), ("matmul", "130x17x9"), ("matmul", "33x129x20"),
           ("dense_bias_relu", "9x21x11"), ("batch_matmul", "2x9x20x7"),
           ("conv2d", "1,3,7,7,5,3,3,2,1"), ("conv2d", "2,9,6,10,11,3,3,1,1"), ("conv2d", "1,2,5,5,3,1,1,1,0"),
           ("depthwise_conv2d", "1,5,9,7,3,3,1,1"), ("depthwise_conv2d", "2,3,8,8,3,3,2,0")]


@pytest.mark.parametrize("kind,shape", AWKWARD)
def test_expert_schedules_simulate_correctly(kind, shape):
    s = expert_schedule(make_op(kind, shape), TARGET)
    out, ref = simulate_schedule(s)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))


@pytest.mark.parametrize("kind,shape", AWKWARD[:3] + AWKWARD[6:8])
def test_default_schedule_simulates_correctly(kind, shape):
    out, ref = simulate_schedule(Schedule(make_op(kind, shape)))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_random_gpu_schedules_simulate_correctly(kind):
    for s in random_examples(kind, EXAMPLES):
        out, ref = simulate_schedule(s)
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))


def test_the_rules_count_the_shared_memory_the_renderer_lays_out():
    """``rules.shared_bytes`` (what legality and the action mask check, before lowering)
    is the dynamic shared memory the rendered kernel is launched with, for expert
    schedules of every dtype (padded and pipelined stages) and random ones."""
    from kernels import experts
    from kernels.codegen.rules import shared_bytes
    schedules = [s for kind in KINDS for s in random_examples(kind, EXAMPLES)]
    for dtype in ("fp32", "tf32", "bf16"):
        for kind, shape in (("matmul", "256x256x256"), ("matmul", "96x40x48"), ("conv2d", "1,32,14,14,32,3,3,1,1"),
                            ("conv2d", "4,32,8,8,16,1,1,1,0")):
            schedules.append(expert_schedule(make_op(kind, shape, dtype), TARGET))
    schedules.append(experts._gpu_matmul_tensor_cores(make_op("matmul", "128x128x256", "bf16"), TARGET, False,
                                                      ((2, 2, 2, 4),), 64, 3))
    assert any(s.nest.tensorized for s in schedules) and any(s.nest.buffers("A") > 1 for s in schedules)
    for s in schedules:
        assert shared_bytes(s.op, s.nest) == render(s, TARGET).shared_bytes, describe(s)


def test_random_gpu_schedules_are_varied():
    seen: dict[str, int] = {}
    for kind in KINDS:
        for s in random_examples(kind, EXAMPLES):
            nest = s.nest
            feats = {type(x).__name__ for x in s.steps}
            if nest.guards:
                feats.add("tail")
            if any(bound_axis(l) and bound_axis(l).startswith("threadIdx") for l in nest.loops):
                feats.add("threads")
            if any(nest.index(a) > max(nest.index(l.name) for l in nest.loops if bound_axis(l))
                   for _, a in nest.cache_reads):
                feats.add("shared inside threads")
            for f in feats:
                seen[f] = seen.get(f, 0) + 1
    for f in ("Split", "Fuse", "Reorder", "Bind", "CacheWrite", "CacheRead", "Unroll", "Vectorize", "tail",
              "threads", "shared inside threads"):
        assert seen.get(f, 0) >= 3, (f, seen)


def test_the_simulator_catches_a_missing_barrier():
    s = expert_schedule(make_op("matmul", "16x16x16"), TARGET)
    fn = ir.lower(s, gpu=True)

    def strip(stmts):
        out = []
        for x in stmts:
            if isinstance(x, ir.Sync):
                continue
            if isinstance(x, (ir.For, ir.If)):
                x.body = strip(x.body)
            out.append(x)
        return out

    fn.body = strip(fn.body)
    op = s.op
    inputs = op.random_inputs(np.random.default_rng(0))
    with pytest.raises(GpuFault, match="race|unset"):
        simulate(fn, launch_config(s.nest), {**inputs, "C": np.full(op.output.shape, np.nan)})


# ---------------------------------------------------------------- nvcc

@needs_nvcc
def test_generated_cuda_compiles_with_nvcc(tmp_path):
    sources = []
    for n, (kind, shape) in enumerate(AWKWARD + [("matmul", "1024x1024x1024"), ("matmul", "1000x1000x999"),
                                                 ("conv2d", "1,64,56,56,64,3,3,1,1")]):
        op = make_op(kind, shape)
        sources.append(render(expert_schedule(op, TARGET), TARGET, name=f"expert{n}").source)
        sources.append(render(Schedule(op), TARGET, name=f"naive{n}").source)
    for kind in KINDS:
        for n, s in enumerate(random_examples(kind, EXAMPLES)):
            sources.append(render(s, TARGET, name=f"random_{kind}_{n}").source)
    nvcc_compile(sources, tmp_path)


# ---------------------------------------------------------------- on a GPU

def _gpu_target():
    pytest.importorskip("cupy")
    try:
        return get_target("cuda")
    except (OSError, ValueError) as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def gpu_measurer(tmp_path_factory):
    from kernels.measure import Builder, Measurer, Runner

    target = _gpu_target()
    builder = Builder(cache_dir=tmp_path_factory.mktemp("cuda-build"))
    runner = Runner(timeout_s=60, repeats=2, warmup=1, min_time_s=0.0)
    with Measurer(target, builder=builder, runner=runner) as m:
        yield m


def _measure(m, schedule: Schedule):
    kernel = render(schedule, m.target)
    return m.measure_one(Candidate(schedule.op, f"source:{kernel.digest}", kernel))


@pytest.mark.parametrize("kind,shape", AWKWARD + [("matmul", "512x512x512")])
def test_gpu_experts_match_reference(gpu_measurer, kind, shape):
    s = expert_schedule(make_op(kind, shape), gpu_measurer.target)
    res = _measure(gpu_measurer, s)
    assert res.ok and res.correct, f"{res.error}\n{describe(s)}"


@pytest.mark.parametrize("kind", KINDS)
def test_gpu_random_schedules_match_reference(gpu_measurer, kind):
    for s in random_examples(kind, EXAMPLES):
        res = _measure(gpu_measurer, s)
        assert res.ok and res.correct, f"{res.error}\n{describe(s)}"


def test_gpu_failures_are_values(gpu_measurer):
    op = make_op("matmul", "64x64x64")
    good = render(expert_schedule(op, gpu_measurer.target), gpu_measurer.target)
    bad_syntax = dataclasses.replace(good, source=good.source.replace("__syncthreads();", "__syncthreads()", 1))
    wild = dataclasses.replace(good, source=good.source.replace("C[i_o", "C[1 << 30 + i_o", 1))
    for k, why in ((bad_syntax, "compile error"), (wild, "")):
        res = gpu_measurer.measure_one(Candidate(op, f"source:{k.digest}", k))
        assert not res.ok and why in (res.error or ""), res
    res = _measure(gpu_measurer, expert_schedule(op, gpu_measurer.target))
    assert res.ok, res.error  # a fresh worker after the illegal address


def test_gpu_library_is_timed(gpu_measurer):
    op = make_op("matmul", "256x256x256")
    kernel = render(expert_schedule(op, gpu_measurer.target), gpu_measurer.target)
    built = gpu_measurer.builder.build([kernel])[0]
    res = gpu_measurer.runner.run(op, kernel, built.path, library=True)
    assert res.ok and res.library_times_ms and res.build_s > 0, res


# Hand-written 8x8x8 matmuls, one thread an element, each failing one part of the check.
CHECKED_MATMUL = """
__device__ int seen[64];
__device__ unsigned calls[64];
extern "C" __global__ void f(float* __restrict__ A, float* __restrict__ B, float* __restrict__ C) {
  const int t = threadIdx.x, i = t / 8, j = t % 8;
  PROLOGUE
  float acc = 0.0f;
  for (int k = 0; k < 8; k++) acc += A[i * 8 + k] * B[k * 8 + j];
  C[t] = acc;
  EPILOGUE
}
"""
FLIP_ONE_ULP = "C[t] = __int_as_float(__float_as_int(acc) ^ 1);"
# the verified call: a timed sample, or one more launch when timing stopped before the drawn one
LATER_CALL = r"(timed call \d+|call \d+ \(after timing\))"


@pytest.mark.parametrize("prologue,epilogue,error", [
    ("", "", None),
    ("if (seen[t]) return;", "seen[t] = 1;", rf"wrong result on {LATER_CALL}: NaN or inf in output"),
    ("unsigned n = ++calls[t];", f"if (n > 1 && t == n % 64) {FLIP_ONE_ULP}",
     rf"nondeterministic output: {LATER_CALL} differs from the first call in 1 element"),
    ("", "if (t == 0) C[64] = 0.0f;", r"wrote out of bounds of C \(after the end\)$"),
    ("", "if (t == 0) C[-1] = 0.0f;", r"wrote out of bounds of C \(before the start\)$"),
    ("", "if (t == 0) A[64] = 0.0f;", r"wrote out of bounds of A \(after the end\)$"),
    ("", "if (t == 0) B[-1] = 0.0f;", r"wrote out of bounds of B \(before the start\)$"),
], ids=["good", "idle-after-first", "nondeterministic", "C-after", "C-before", "A-after", "B-before"])
def test_gpu_check_failures(gpu_measurer, prologue, epilogue, error):
    """Right once then idle, a later launch one ulp off, a write past a buffer: each fails
    the GPU check with its reason (and the worker is replaced: the next kernel is fine)."""
    import re

    from kernels.codegen.kernel import Kernel

    op = make_op("matmul", "8x8x8")
    source = CHECKED_MATMUL.replace("PROLOGUE", prologue).replace("EPILOGUE", epilogue)
    k = Kernel("f", source, op.tensors, ((1, 1, 1), (64, 1, 1)))
    res = gpu_measurer.measure_one(Candidate(op, f"source:{k.digest}", k))
    if error is None:
        assert res.ok and res.correct, res.error
    else:
        assert not res.ok and not res.correct and re.match(error, res.error or ""), res.error
    assert _measure(gpu_measurer, expert_schedule(op, gpu_measurer.target)).ok


# ---------------------------------------------------------------- tensor cores

TENSOR_SHAPES = [("matmul", "32x16x32"), ("matmul", "40x24x48"), ("dense_bias_relu", "17x9x16"),
                 ("batch_matmul", "2x16x8x32")]


@pytest.mark.parametrize("dtype", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("kind,shape", TENSOR_SHAPES)
def test_tensorized_experts_simulate_correctly(kind, shape, dtype):
    """The mma fragments as the lowering loads them, executed with the PTX ISA's layout."""
    s = expert_schedule(make_op(kind, shape, dtype), TARGET)
    assert s.nest.tensorized, describe(s)
    out, ref = simulate_schedule(s)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))


@pytest.mark.parametrize("buffers", [2, 3, 4])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_pipelined_stages_simulate_correctly(buffers, dtype):
    """A stage of 2-4 buffers over 6 slices: each slice is waited for before it is read
    (the simulation lands asynchronous copies only at a wait) and never overwritten while
    another thread reads it."""
    from kernels import experts
    op = make_op("matmul", "32x16x192", dtype)
    if dtype == "fp32":   # the SIMT expert, its own pipeline taken off
        s = Schedule(op)
        for step in experts._gpu_matmul(op, TARGET, False, (2, 4, 4, 4, 32)).steps:
            s = s if isinstance(step, DoubleBuffer) else s.apply(step)
        s = experts._pipelined(s, ("A", "B"), TARGET, buffers)
    else:
        s = experts._gpu_matmul_tensor_cores(op, TARGET, False, ((1, 1, 2, 2),), 64, buffers)
    assert max(s.nest.buffers(t) for t in "AB") == buffers, describe(s)
    out, ref = simulate_schedule(s)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))


@pytest.mark.parametrize("dtype,shape", [("fp32", "32x16x200"), ("bf16", "64x64x208")])
def test_a_pipelined_stage_with_a_tail_simulates_correctly(dtype, shape):
    """The stage's loop has a last, partial slice (K not a multiple of the slice): its copies
    read zeros beyond the tensor, and the prefetches stop at the loop's end."""
    from kernels import experts
    op = make_op("matmul", shape, dtype)
    if dtype == "fp32":
        s = Schedule(op)
        for step in experts._gpu_matmul(op, TARGET, False, (2, 4, 4, 4, 32)).steps:
            s = s if isinstance(step, DoubleBuffer) else s.apply(step)
        s = experts._pipelined(s, ("A", "B"), TARGET, 3)
    else:
        s = experts._gpu_matmul_warpgroup(op, TARGET, False, buffers=3)
    anchor = dict(s.nest.cache_reads)["A"]
    k_loops = {anchor} | {l.name for l in s.nest.inside(anchor) if l.reduce}
    assert s.nest.buffers("A") == 3 and any(e.vars() & k_loops for e, _ in s.nest.guards), describe(s)
    out, ref = simulate_schedule(s)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))


def test_a_pipeline_run_again_by_an_outer_loop_waits_for_its_readers():
    """A 3-buffer stage of A over a loop of 2 slices, run again by the serial k_o: the next
    run's prologue refills the buffers the last slices were read from, so a barrier must
    end each run (without it thread 0 overwrote A_shared[1] while thread 1 read it)."""
    op = make_op("matmul", "4x6x8")
    s = Schedule(op).split("k", 2).bind("j", "threadIdx.x").cache_read("A", "k_i").cache_write("j")
    s = s.double_buffer("A").double_buffer("A")
    assert s.nest.buffers("A") == 3
    out, ref = simulate_schedule(s)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))


@pytest.mark.parametrize("dtype", ["tf32", "bf16"])
def test_stage_rows_keep_a_warps_fragment_reads_in_distinct_banks(dtype):
    """A row along k is read 16 bytes from each of 8 rows (ldmatrix); a tf32 row along n
    an element at a time, lane (g, t) at row t, column g. Either way the 32 lanes' words
    fall in 32 distinct banks, as the padding of the stages' rows makes them."""
    from kernels.ir.schedule import footprint
    from kernels import experts
    op = make_op("matmul", "256x256x256", dtype)
    nest = experts._gpu_matmul_tensor_cores(op, TARGET, False).nest   # mma (warpgroups swizzle instead)
    assert nest.tensorized
    elem = 4 if dtype == "tf32" else 2
    for tensor, anchor in nest.cache_reads:
        dims = footprint(op, nest, tensor, anchor, also=ir.thread_loops(nest))
        row = (dims[-1][2] + ir.stage_padding(op, nest, dims)) * elem // 4      # words
        if tensor == "B" and dtype == "tf32":
            words = [t * row + g for g in range(8) for t in range(4)]
        else:                                                                   # 8 rows x 4 words
            words = [r * row + w for r in range(8) for w in range(4)]
        assert sorted(w % 32 for w in words) == list(range(32)), (tensor, row)


def test_fragments_are_loaded_once_per_k_step():
    """A warp's 2 x 4 instructions share 2 A and 4 B fragments per k step: 6 loads, not 16."""
    from kernels import experts
    op = make_op("matmul", "64x64x64", "bf16")
    src = render(experts._gpu_matmul_tensor_cores(op, TARGET, False, ((1, 1, 2, 4),)), TARGET).source
    body = src[src.index("for (int k_o_i"):]
    assert body.count("ldmatrix.sync") == 2, body    # one A and one B fill, each in an unrolled loop
    assert "tc_a[" in body and "tc_b[" in body


# each form of the implicit GEMM: m along a row (x >= 16), along the batch, along fused pixels
TENSOR_CONV_SHAPES = [("conv2d_bias_relu", "1,16,5,18,8,3,3,1,1"), ("conv2d", "16,32,3,3,16,3,3,2,1"),
                      ("conv2d", "1,16,6,6,24,3,3,1,1"), ("conv2d", "2,32,5,7,8,1,1,1,0")]


@pytest.mark.parametrize("dtype", ["tf32", "bf16"])
@pytest.mark.parametrize("kind,shape", TENSOR_CONV_SHAPES)
def test_tensorized_convolutions_simulate_correctly(kind, shape, dtype, monkeypatch):
    from kernels import experts
    monkeypatch.setattr(experts, "TENSOR_CORE_MIN_PIXELS", 0)    # small shapes take tensor cores too
    s = expert_schedule(make_op(kind, shape, dtype), TARGET)
    assert s.nest.tensorized, describe(s)
    out, ref = simulate_schedule(s)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))


@pytest.mark.parametrize("dtype", ["tf32", "bf16"])
@pytest.mark.parametrize("shape", ["2,16,10,12,24,3,3,1,1", "3,16,20,18,8,3,3,2,1"])
def test_fused_pixels_of_a_window_stage_the_rows_their_run_spans(shape, dtype, monkeypatch):
    """m along fused pixels: the block's stage of the input is the box of rows that any
    run of its pixels spans (halo and tail included), read through ``/`` and ``%``."""
    from kernels import experts
    monkeypatch.setattr(experts, "TENSOR_CORE_MIN_PIXELS", 0)
    s = expert_schedule(make_op("conv2d", shape, dtype), TARGET)
    assert any(str(x) == "Fuse('y', 'x')" for x in s.steps) and "I" in dict(s.nest.cache_reads), describe(s)
    out, ref = simulate_schedule(s)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))



@pytest.mark.parametrize("dtype", ["tf32", "bf16"])
@pytest.mark.parametrize("shape,run", [("2,32,4,8,8,1,1,1,0", 32), ("2,32,3,20,8,1,1,1,0", 60)])
def test_a_pointwise_layer_stages_one_run_of_fused_pixels_per_channel(shape, run, dtype):
    """Without a window the expert's m runs along the fused pixels, rows of 16 or more
    too, and the input's stage is the block's run in each channel, a row of the flattened
    image (the last run stops at the image's end)."""
    s = expert_schedule(make_op("conv2d", shape, dtype), TARGET)
    anchor = dict(s.nest.cache_reads).get("I")
    assert s.nest.tensorized and anchor and any(str(x) == "Fuse('y', 'x')" for x in s.steps), describe(s)
    dims = footprint(s.op, s.nest, "I", anchor, also=ir.thread_loops(s.nest))
    assert len(dims) == 3 and dims[-1][2] <= run, dims
    out, ref = simulate_schedule(s)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))

@pytest.mark.parametrize("shape,chunk", [("2,16,4,24,8,3,3,1,1", 16), ("2,16,5,40,8,3,3,2,1", 16),
                                         ("2,16,4,28,8,3,3,1,1", 8), ("2,16,6,14,8,3,3,1,1", 4)])
def test_a_windowed_convolution_fills_its_stages_in_whole_chunks(shape, chunk, monkeypatch):
    """The input's stage is widened to whole chunks of each row, 16 bytes or, where rows
    are not a multiple of 16 bytes, 8 (28 bf16 elements) or 4 (14, fused pixels: the rows
    a run spans; its halo starts a row at any element); the weights' slice with its whole window is one contiguous run: neither
    fill moves single elements (``cp.async`` where double-buffered, else a vector move)."""
    from kernels import experts
    monkeypatch.setattr(experts, "TENSOR_CORE_MIN_PIXELS", 0)
    s = expert_schedule(make_op("conv2d", shape, "bf16"), TARGET)
    assert s.nest.tensorized
    anchor = dict(s.nest.cache_reads)["I"]
    box = ir.stage_footprint(s.op, s.nest, "I", anchor)
    tight = footprint(s.op, s.nest, "I", anchor, also=ir.thread_loops(s.nest))
    assert box[-1][2] % (chunk // 2) == 0 and box[-1][2] > tight[-1][2] and box[-1][0].const % (chunk // 2) == 0
    src = render(s, TARGET).source
    moves = {4: r"cp_async4|\*\(unsigned\*\)", 8: r"cp_async8|\*\(uint2\*\)", 16: r"cp_async16|\*\(uint4\*\)"}
    for stage, size in (("I_shared", chunk), ("W_shared", 16)):
        fills = [line for line in src.split("\n")
                 if re.match(rf"\s*(cp_async\w*\(&|\*\((uint\d|unsigned)\*\)&)?{stage}\[", line)]
        assert fills and all(re.match(rf"\s*({moves[size]})", line) for line in fills), (stage, fills[:2])
    out, ref = simulate_schedule(s)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))


def test_the_simulator_catches_a_wrong_fragment_layout(monkeypatch):
    from kernels.ir import mma
    swapped = (mma.A16[1], mma.A16[0]) + mma.A16[2:]     # rows g and g + 8 exchanged
    monkeypatch.setattr(mma, "A16", swapped)
    s = expert_schedule(make_op("matmul", "32x16x32", "bf16"), TARGET)
    out, ref = simulate_schedule(s)
    assert not np.allclose(out, ref, rtol=1e-6, atol=1e-6)


DTYPE_GPU_CASES = [("matmul", "512x512x512"), ("matmul", "100x72x48"), ("dense_bias_relu", "33x17x64"),
                   ("batch_matmul", "2x64x40x32"), ("conv2d", "1,16,14,14,32,3,3,1,1"), ("matmul", "64x64x24"),
                   ("conv2d_bias_relu", "2,32,10,20,24,1,1,1,0"), ("conv2d", "16,32,7,7,16,1,1,1,0"),
                   ("conv2d", "2,32,5,7,8,1,1,1,0")]


@pytest.mark.parametrize("dtype", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("kind,shape", DTYPE_GPU_CASES)
def test_gpu_dtype_experts_match_reference(gpu_measurer, kind, shape, dtype):
    """Tensor cores where the expert tensorizes (the fragment layout on real hardware),
    fp32 arithmetic on 16-bit storage elsewhere; each with the library in its dtype."""
    s = expert_schedule(make_op(kind, shape, dtype), gpu_measurer.target)
    res = _measure(gpu_measurer, s)
    assert res.ok and res.correct, f"{res.error}\n{describe(s)}"


def test_gpu_a_wrong_tensor_core_kernel_fails_its_dtype_check(gpu_measurer):
    """One k-step of the instruction left out: every dtype's tolerance refuses it."""
    for dtype in ("tf32", "bf16", "fp16"):
        s = expert_schedule(make_op("matmul", "256x128x512", dtype), gpu_measurer.target)
        good = render(s, gpu_measurer.target)
        wrong = good.source.replace("for (int k_o_o = 0; k_o_o < ", "for (int k_o_o = 1; k_o_o < ", 1)
        assert wrong != good.source
        bad = dataclasses.replace(good, source=wrong)
        res = gpu_measurer.measure_one(Candidate(s.op, "source:wrong", bad))
        assert not res.ok and res.error.startswith("wrong result"), (dtype, res.error)


# ---------------------------------------------------------------- warpgroups (wgmma)

WARPGROUP_SHAPES = [("matmul", "64x64x128"), ("matmul", "100x72x192"), ("batch_matmul", "2x64x64x64"),
                    ("dense_bias_relu", "64x64x64")]


@pytest.mark.parametrize("dtype", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("kind,shape", WARPGROUP_SHAPES)
def test_warpgroup_experts_simulate_correctly(kind, shape, dtype):
    """The stages as the descriptors read them (the 64 x 16 and 16 x n tiles), each thread's
    accumulators where wgmma puts them, each wgmma's reads unchanged until its wait; tails
    of m and n (100 x 72) and a single slice (K = 64) included."""
    s = expert_schedule(make_op(kind, shape, dtype), TARGET)
    assert s.nest.warpgroup, describe(s)
    out, ref = simulate_schedule(s)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))


def test_the_simulator_catches_a_wgmma_left_running_over_a_refill():
    """Two wgmma groups left in flight instead of one: the copy of the slice after next then
    refills the buffer a running wgmma still reads."""
    s = expert_schedule(make_op("matmul", "64x64x384", "bf16"), TARGET)
    assert s.nest.warpgroup and s.nest.buffers("A") >= 3, describe(s)
    fn = ir.lower(s, gpu=True)

    def loosen(stmts):
        for i, x in enumerate(stmts):
            if isinstance(x, ir.WgmmaWait) and x.pending:
                stmts[i] = ir.WgmmaWait(x.pending + 1)
            if isinstance(x, (ir.For, ir.If)):
                loosen(x.body)

    loosen(fn.body)
    op = s.op
    inputs = {n: decode(a, op.dtype) for n, a in op.random_inputs(np.random.default_rng(0)).items()}
    with pytest.raises(GpuFault, match="overwrites what a running wgmma reads|changed before its wait"):
        simulate(fn, launch_config(s.nest), {**inputs, "C": np.full(op.output.shape, np.nan)})


def test_warpgroup_refusals():
    from kernels import experts
    from kernels.ir.schedule import Warpgroup
    op = make_op("matmul", "256x256x256", "bf16")
    wg = expert_schedule(op, TARGET)
    assert isinstance(wg.steps[-1], Warpgroup)
    before = Schedule(op, wg.steps[:-1])
    with pytest.raises(ScheduleError, match="wgmma takes tf32, bf16, fp16, not fp32"):
        Schedule(make_op("matmul", "256x256x256", "fp32"), experts._gpu_matmul(
            make_op("matmul", "256x256x256", "fp32"), TARGET, False).steps).warpgroup()
    with pytest.raises(ScheduleError, match="bound to threadIdx.x"):
        experts._gpu_matmul_tensor_cores(op, TARGET, False).warpgroup()
    with pytest.raises(ScheduleError, match="the nest is not tensorized"):
        Schedule(op).warpgroup()
    with pytest.raises(ScheduleError, match="issued by warpgroups already"):
        wg.warpgroup()
    with pytest.raises(ScheduleError, match="must lie inside its k loops"):
        wg.reorder("j_o_i", "k_o_i")   # nothing may move what the instruction relies on
    with pytest.raises(ScheduleError, match="runs on sm_90"):
        check_for_target(wg, cuda_target_for_compile("sm_80"))
    assert not before.nest.warpgroup
    check_for_target(wg, TARGET)


def test_a_transposed_tf32_stage_is_filled_without_bank_conflicts():
    """wgmma reads a tf32 B along k: its stage holds B transposed, filled element by
    element. A warp's 32 copies read 4 runs of 8 consecutive elements of B and, after the
    128-byte swizzle, write 32 distinct banks."""
    op = make_op("matmul", "512x512x512", "tf32")
    s = expert_schedule(op, TARGET)
    assert s.nest.warpgroup, describe(s)

    def copies(stmts):
        for x in stmts:
            if isinstance(x, ir.Store) and x.buffer == "B_shared":
                yield x
            elif isinstance(x, (ir.For, ir.If)):
                yield from copies(x.body)
    store = next(copies(ir.lower(s, gpu=True).body))
    env0 = {v: 0 for v in store.index.vars() | store.value.index.vars()}
    lanes = [{**env0, ir.LANE: lane} for lane in range(32)]
    reads = sorted(store.value.index.evaluate(e) for e in lanes)
    runs = [reads[i:i + 8] for i in range(0, 32, 8)]
    assert all(r == list(range(r[0], r[0] + 8)) for r in runs), reads
    banks = set()
    for e in lanes:
        byte = store.index.evaluate(e) * 4
        banks.add((byte ^ (((byte >> 7) & 7) << 4)) // 4 % 32)
    assert len(banks) == 32
    assert "cp_async4s(" in render(s, TARGET).source


def test_batched_products_count_every_matrix_s_blocks():
    """The SIMT tile counts the blocks of every matrix of a batch: 96 products of 128 x 128
    fill the GPU with 64 x 64 tiles, where one takes 32 x 32 tiles; a tensor-core tile
    counts one matrix's (smaller ones ran slower on a batch)."""
    def launch(shape, dtype="fp32"):
        return render(expert_schedule(make_op("batch_matmul", shape, dtype), TARGET), TARGET).launch
    assert launch("96x128x128x64") == ((2, 2, 96), (16, 8, 1))    # 64x64 tiles of 8x4
    assert launch("1x128x128x64") == ((4, 4, 1), (16, 16, 1))     # 32x32 tiles of 2x2
    assert launch("96x128x128x64", "bf16")[1] == launch("1x128x128x64", "bf16")[1]


# ---------------------------------------------------------------- fp32 on tensor cores (3xTF32)

def _split_tiles(kind: str, shape: str):
    from kernels.experts import SPLIT_MMA_TILES, _gpu_matmul_tensor_cores
    return _gpu_matmul_tensor_cores(make_op(kind, shape), TARGET, kind == "batch_matmul", tiles=SPLIT_MMA_TILES)


@pytest.mark.parametrize("kind,shape", TENSOR_SHAPES + [("matmul", "48x40x96")])
def test_fp32_tensor_core_tiles_simulate_correctly(kind, shape):
    """fp32 tensorized: each k slice summed into fresh accumulators, then into the thread's."""
    s = _split_tiles(kind, shape)
    assert s.nest.tensorized, describe(s)
    out, ref = simulate_schedule(s)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))


def test_fp32_tensor_cores_split_each_operand_and_sum_slices_apart():
    """3xTF32: every operand register has a remainder twin, each tile takes three ``mma``
    (remainder x high, high x remainder, high x high) into the slice's accumulators, which
    are zeroed at the head of the stage's k loop and added to the thread's at its end."""
    fp32 = render(_split_tiles("matmul", "256x256x256"), TARGET).source
    from kernels.experts import SPLIT_MMA_TILES, _gpu_matmul_tensor_cores
    tf32 = render(_gpu_matmul_tensor_cores(make_op("matmul", "256x256x256", "tf32"), TARGET, False,
                                           tiles=SPLIT_MMA_TILES), TARGET).source
    assert fp32.count("mma.sync") == 3 * tf32.count("mma.sync") == 3
    mmas = re.findall(r'"r"\((tc_a\w*)\[.*?"r"\((tc_b\w*)\[', fp32)
    assert [(a, b) for a, b in mmas] == [("tc_a_lo", "tc_b"), ("tc_a", "tc_b_lo"), ("tc_a", "tc_b")]
    assert "unsigned tc_a[16], tc_a_lo[16];" in fp32 and "tc_b_lo[" in fp32
    assert "tc_a_lo[i_o_i*4] = tf32(f0 - __uint_as_float(r0));" in fp32
    assert re.search(r"for \(int k_o_o = 0; k_o_o < 16; \+\+k_o_o\) \{\s*float C_slice\[64\];", fp32)
    assert "C_local[C_slice_z] += C_slice[C_slice_z];" in fp32 and '"+f"(C_slice[' in fp32
    assert "C_slice" not in tf32


def test_the_fp32_expert_takes_tensor_cores_on_large_grids_and_pointwise_layers():
    def tensorized(kind, shape, target=TARGET):
        return bool(expert_schedule(make_op(kind, shape), target).nest.tensorized)
    assert tensorized("matmul", "4096x4096x4096") and tensorized("dense_bias_relu", "2048x2048x1024")
    assert not tensorized("matmul", "1024x1024x1024")           # 128 blocks of 128 x 64: under 2.5 a multiprocessor
    assert not tensorized("matmul", "4096x4096x4100")           # K not in whole steps of 8
    assert not tensorized("batch_matmul", "8x2048x2048x512")    # not measured: the CUDA cores
    assert not tensorized("matmul", "4096x4096x4096", cuda_target_for_compile("sm_75"))   # no tf32 mma.sync
    assert tensorized("conv2d", "1,256,56,56,64,1,1,1,0")
    assert not tensorized("conv2d", "16,256,14,14,256,3,3,1,1")


@pytest.mark.parametrize("kind,shape", [("matmul", "512x256x4096"), ("dense_bias_relu", "256x512x1024"),
                                        ("conv2d", "4,256,14,14,64,1,1,1,0")])
def test_gpu_fp32_tensor_core_kernels_pass_fp32_s_check(gpu_measurer, kind, shape):
    s = (expert_schedule(make_op(kind, shape), gpu_measurer.target) if kind == "conv2d"
         else _split_tiles(kind, shape))
    assert s.nest.tensorized
    res = _measure(gpu_measurer, s)
    assert res.ok and res.correct, f"{res.error}\n{describe(s)}"


def test_gpu_fp32_on_tensor_cores_without_the_split_is_refused(gpu_measurer):
    """Plain tf32 (the remainders' two ``mma`` left out) is 2**-11 off per input: fp32's
    tolerance refuses it, so a kernel can be fast on tensor cores only with fp32's accuracy."""
    s = _split_tiles("matmul", "512x256x4096")
    good = render(s, gpu_measurer.target)
    lines = good.source.split("\n")
    wrong = "\n".join(line for line in lines if not ("mma.sync" in line and "_lo[" in line))
    assert wrong.count("mma.sync") == good.source.count("mma.sync") // 3
    res = gpu_measurer.measure_one(Candidate(s.op, "source:plain-tf32", dataclasses.replace(good, source=wrong)))
    assert not res.ok and res.error.startswith("wrong result"), res.error


def test_fp32_tensor_cores_with_the_whole_reduction_unrolled_sum_in_one_slice():
    """No serial k loop: the thread's accumulators are the slice (kernels.ir.lower._slice_loop)."""
    op = make_op("matmul", "32x16x32")
    s = (Schedule(op).split("i", 16).split("j", 8).split("k", 8)
         .reorder("i_o", "j_o", "k_o", "i_i", "j_i", "k_i").tensorize("i_i", "j_i", "k_i")
         .bind("i_o", "blockIdx.y").bind("j_o", "threadIdx.x").cache_write("j_o").unroll("k_o"))
    source = render(s, TARGET).source
    assert "C_slice" not in source and source.count("mma.sync") == 3
    out, ref = simulate_schedule(s)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))
