"""Fuzz: random legal schedules of every operator, compiled for the CPU, against numpy.

The reference here is written from each operator's definition (einsum over a
zero-padded input for convolutions), not taken from ``kernels.ir.ops``, so a mistake
shared by an operator's declaration and its ``reference`` cannot hide. Shapes are
odd and prime; convolutions take strides 1 to 3 and padding 0 to 2.

Half of the schedules are drawn step by step, the way
``agents.sampling.random_schedule`` does with ``by="primitive"``, but through the
schedule IR itself rather than the environment's (stricter) action mask: a
primitive is drawn among those that still have a legal step, then one of its
steps; a step that raises ``ScheduleError`` is not legal. The other half are
shaped like a tuner's register tiles: a few structural steps, then caches,
unrolled inner loops, vectorize and parallel, each now and then left out.

Kernels are compiled many to a shared object, batches in parallel, and run in a
child process, so a crash fails only the kernel that crashed.

``SCHEDGYM_FUZZ_SCHEDULES`` sets how many schedules (default 400, in CI);
``SCHEDGYM_FUZZ_SEED`` the seed. Set a large count for a longer run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from kernels.ir.printer import print_loop_nest
from kernels.ir.ops import make_op
from kernels.codegen import render
from kernels.ir.schedule import (CacheRead, CacheWrite, Fuse, Parallel, Reorder, Schedule, ScheduleError,
                              Split, Tile, Unroll, Vectorize)
from kernels.target import CC, CFLAGS, cpu_target

COUNT = int(os.environ.get("SCHEDGYM_FUZZ_SCHEDULES", "400"))
SEED = int(os.environ.get("SCHEDGYM_FUZZ_SEED", "20250611"))
KINDS = ("matmul", "batch_matmul", "dense_bias_relu", "conv2d", "depthwise_conv2d")
MAX_STEPS = 12
KERNELS_PER_OBJECT = 16
RUN_TIMEOUT_S = 120     # one object's kernels, in the child
TOLERANCE = 1e-4        # of the largest output: fp32 sums in another order than float64

ODD = (1, 2, 3, 5, 7, 9, 11, 13, 17)
FACTORS = (2, 3, 4, 5, 7, 8, 16)
PRIMITIVES = ("split", "tile", "reorder", "fuse", "vectorize", "unroll", "parallel",
              "cache_write", "cache_read", "done")


# ---------------------------------------------------------------- shapes

def random_shape(kind: str, rng: np.random.Generator) -> tuple[int, ...]:
    def pick(values=ODD):
        return int(rng.choice(values))

    if kind in ("matmul", "dense_bias_relu"):
        return pick(), pick(ODD + (16, 32)), pick()
    if kind == "batch_matmul":
        return pick((1, 2, 3)), pick(), pick(), pick()
    while True:
        n, c, k = pick((1, 2)), pick((1, 2, 3, 5)), pick((1, 2, 3, 5, 7))
        r, s = pick((1, 2, 3, 5)), pick((1, 2, 3))
        stride, pad = pick((1, 2, 3)), pick((0, 1, 2))
        h, w = pick((1, 2, 3, 5, 7, 9, 11)), pick((1, 2, 3, 5, 7, 9, 11, 13))
        if h + 2 * pad >= r and w + 2 * pad >= s:
            break
    if kind == "depthwise_conv2d":
        return n, c, h, w, r, s, stride, pad
    return n, c, h, w, k, r, s, stride, pad


# ---------------------------------------------------------------- schedules

def _candidates(schedule: Schedule, prim: str, rng: np.random.Generator) -> list:
    """Steps of primitive ``prim`` naming loops of ``schedule`` as it is now, legal or not;
    an entry is one step or a tuple of steps applied together."""
    nest = schedule.nest
    loops = nest.loops
    names = [l.name for l in loops]
    n = len(loops)

    def factors(extent: int) -> list[int]:
        return [f for f in FACTORS if f < extent] + [extent]

    if prim == "split":
        return [Split(l.name, f) for l in loops for f in factors(l.extent)]
    if prim == "tile":
        return [Tile(a.name, b.name, int(rng.choice(factors(a.extent))), int(rng.choice(factors(b.extent))))
                for i, a in enumerate(loops) for b in loops[i + 1:]]
    if prim == "reorder":
        out = [Reorder((names[i + 1], names[i])) for i in range(n - 1)]
        if n > 2:  # and now and then a bigger shuffle
            k = int(rng.integers(2, n + 1))
            out.append(Reorder(tuple(rng.permutation(names)[:k])))
        return out
    if prim == "fuse":
        return [Fuse(names[i], names[i + 1]) for i in range(n - 1)]
    if prim == "vectorize":
        # only the innermost loop can take it, and that starts out a reduce loop: also
        # offer each spatial loop swapped innermost first
        return [Vectorize(names[-1])] + [(Reorder((names[-1], l.name)), Vectorize(l.name))
                                         for l in loops[:-1] if not l.reduce]
    if prim == "unroll":
        return [Unroll(x) for x in names]
    if prim == "parallel":
        return [Parallel(names[0])]
    if prim == "cache_write":
        return [CacheWrite(x) for x in names]
    if prim == "cache_read":
        op = schedule.op
        return [CacheRead(t, x) for t in (op.lhs.tensor, op.rhs.tensor) for x in names]
    raise ValueError(prim)


def _apply_one(schedule: Schedule, cands: list, rng: np.random.Generator) -> Schedule | None:
    """``schedule`` with the first legal candidate in a random order, or None."""
    for i in rng.permutation(len(cands)):
        try:
            new = schedule
            for step in cands[i] if isinstance(cands[i], tuple) else (cands[i],):
                new = new.apply(step)
            return new
        except ScheduleError:
            continue
    return None


def random_steps(op, rng: np.random.Generator, max_steps: int = MAX_STEPS) -> Schedule:
    """Draw a primitive among those with a legal step (``done`` ends the schedule), then
    one of its legal steps; up to ``max_steps`` times."""
    schedule = Schedule(op)
    for _ in range(max_steps):
        prims = list(PRIMITIVES)
        while True:
            prim = prims.pop(int(rng.integers(len(prims))))
            if prim == "done":
                return schedule
            new = _apply_one(schedule, _candidates(schedule, prim, rng), rng)
            if new is not None:
                schedule = new
                break
    return schedule


def random_tile(op, rng: np.random.Generator) -> Schedule:
    """A few random structural steps, then what makes a register tile, each now and then
    left out and in a random order: caches, a parallel outer loop, a vectorized innermost
    loop, unrolled inner loops (from the inside out, as far as allowed)."""
    schedule = Schedule(op)
    for _ in range(int(rng.integers(1, 5))):
        prim = ("split", "tile", "reorder", "fuse")[int(rng.integers(4))]
        schedule = _apply_one(schedule, _candidates(schedule, prim, rng), rng) or schedule
    annotations = ["cache_write", "cache_read", "cache_read", "parallel", "vectorize",
                   "unroll", "unroll", "unroll"]
    for i in rng.permutation(len(annotations)):
        prim = annotations[i]
        if rng.random() < 0.25:
            continue
        if prim == "unroll":
            rolled = [l.name for l in schedule.nest.loops if l.kind not in ("unroll", "vectorize")]
            cands = [Unroll(rolled[-1])] if rolled else []
        else:
            cands = _candidates(schedule, prim, rng)
        schedule = _apply_one(schedule, cands, rng) or schedule
    return schedule


def random_schedule(op, rng: np.random.Generator) -> Schedule:
    """A random legal schedule of ``op``: half of them step by step, half tile-shaped."""
    return random_steps(op, rng) if rng.random() < 0.5 else random_tile(op, rng)


def draw_cases(count: int, seed: int) -> list[Schedule]:
    """``count`` schedules, the operators in turn, each a fresh random shape."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        op = make_op(kind, random_shape(kind, rng))
        out.append(random_schedule(op, rng))
    return out


# ---------------------------------------------------------------- the reference

def _conv_out(size: int, r: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - r) // stride + 1


def expected_shapes(kind: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Argument shapes from the operator's definition."""
    if kind in ("matmul", "dense_bias_relu"):
        m, n, k = shape
        out = {"A": (m, k), "B": (k, n), "C": (m, n)}
        return {**out, "bias": (n,)} if kind == "dense_bias_relu" else out
    if kind == "batch_matmul":
        b, m, n, k = shape
        return {"A": (b, m, k), "B": (b, k, n), "C": (b, m, n)}
    if kind == "conv2d":
        n, c, h, w, k, r, s, stride, pad = shape
        return {"I": (n, c, h, w), "W": (k, c, r, s),
                "O": (n, k, _conv_out(h, r, stride, pad), _conv_out(w, s, stride, pad))}
    n, c, h, w, r, s, stride, pad = shape
    return {"I": (n, c, h, w), "W": (c, 1, r, s),
            "O": (n, c, _conv_out(h, r, stride, pad), _conv_out(w, s, stride, pad))}


def reference(kind: str, shape: tuple[int, ...], x: dict[str, np.ndarray]) -> np.ndarray:
    """The operator's output in float64, from its definition."""
    x = {k: v.astype(np.float64) for k, v in x.items()}
    if kind == "matmul":
        return np.einsum("ik,kj->ij", x["A"], x["B"])
    if kind == "dense_bias_relu":
        return np.maximum(np.einsum("ik,kj->ij", x["A"], x["B"]) + x["bias"][None, :], 0.0)
    if kind == "batch_matmul":
        return np.einsum("bik,bkj->bij", x["A"], x["B"])
    stride, pad = shape[-2:]
    inp, wt = x["I"], x["W"]
    r, s = wt.shape[2:]
    oh, ow = _conv_out(inp.shape[2], r, stride, pad), _conv_out(inp.shape[3], s, stride, pad)
    padded = np.zeros(inp.shape[:2] + (inp.shape[2] + 2 * pad, inp.shape[3] + 2 * pad))
    padded[:, :, pad:pad + inp.shape[2], pad:pad + inp.shape[3]] = inp
    out = 0.0
    for ry in range(r):
        for rx in range(s):
            # window (ry, rx) of every output pixel: rows y*stride + ry, columns x*stride + rx
            patch = padded[:, :, ry:ry + stride * (oh - 1) + 1:stride, rx:rx + stride * (ow - 1) + 1:stride]
            if kind == "conv2d":
                out = out + np.einsum("nchw,kc->nkhw", patch, wt[:, :, ry, rx])
            else:
                out = out + patch * wt[None, :, 0, ry, rx, None, None]
    return out


def inputs_for(schedule: Schedule, seed: int) -> dict[str, np.ndarray]:
    op = schedule.op
    shapes = expected_shapes(op.kind, op.shape)
    assert {t.name: t.shape for t in op.tensors} == shapes, (op.kind, op.shape)
    rng = np.random.default_rng(seed)
    return {t.name: rng.uniform(-1, 1, t.shape).astype(np.float32) for t in op.inputs}


# ---------------------------------------------------------------- build and run

def _combine(sources: list[str]) -> str:
    """One C file from several kernels' sources: their preambles once, then every function."""
    head: list[str] = []
    bodies: list[str] = []
    for src in sources:
        lines = src.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("void "))
        head += [line for line in lines[:start] if line.strip() and line not in head]
        bodies.append("\n".join(lines[start:]))
    return "\n".join(head) + "\n\n" + "\n\n".join(bodies) + "\n"


def build(sources: list[str], path: Path) -> str | None:
    """Compile ``sources`` into the shared object ``path``; the compiler's error, or None."""
    src = path.with_suffix(".c")
    src.write_text(_combine(sources))
    proc = subprocess.run([CC, *CFLAGS, str(src), "-o", str(path)], capture_output=True, text=True)
    return None if proc.returncode == 0 else proc.stderr[-2000:]


# The child: loads an object, calls its kernels one by one on the arrays in a .npz,
# reports each index before calling it (so a crash names its kernel), saves outputs.
_CHILD = r"""
import ctypes, json, os, sys, threading
import numpy as np

def main():
    job = json.load(open(sys.argv[1]))
    lib = ctypes.CDLL(job["object"])
    outs = {}
    for i, k in enumerate(job["kernels"]):
        if i in job["skip"]:
            continue
        print(i, flush=True)
        data = np.load(k["inputs"])
        arrays = [np.full(k["shapes"][a], np.nan, np.float32) if a == k["output"]
                  else np.ascontiguousarray(data[a], np.float32) for a in k["args"]]
        fn = getattr(lib, k["name"])
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * len(arrays)
        fn(*[a.ctypes.data for a in arrays])
        outs[k["name"]] = arrays[k["args"].index(k["output"])]
        inputs = [(arr, data[a]) for a, arr in zip(k["args"], arrays) if a != k["output"]]
        if any(not np.array_equal(x, y) for x, y in inputs):
            outs[k["name"] + ":wrote"] = np.array(1.0)
    np.savez(job["results"], **outs)

def run():
    try:
        main()
    except BaseException as e:  # an exception in a thread would not set the exit code
        print(repr(e), file=sys.stderr, flush=True)
        os._exit(1)

threading.stack_size(64 << 20)  # local buffers live on the stack
t = threading.Thread(target=run)
t.start()
t.join()
"""


def run_object(job: dict, workdir: Path) -> dict:
    """Run every kernel of one object in a child process: name -> output array, or an
    error string for a kernel that crashed or hung (the others then run again without it)."""
    results: dict = {}
    skip: list[int] = []
    env = {**os.environ, "OMP_STACKSIZE": "16M"}
    spec = workdir / f"{Path(job['object']).stem}.json"
    out = spec.with_suffix(".npz")
    while True:
        spec.write_text(json.dumps({**job, "skip": skip, "results": str(out)}))
        try:
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(spec)], capture_output=True,
                                  text=True, env=env, timeout=RUN_TIMEOUT_S)
            stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            stdout, stderr, rc = _text(e.stdout), _text(e.stderr), None
        if rc == 0:
            with np.load(out) as f:
                results.update({k: f[k] for k in f.files})
            return results
        started = [int(x) for x in stdout.split()]
        if not started:
            raise RuntimeError(f"the kernel runner failed before any kernel: {stderr[-2000:]}")
        why = (f"hung (> {RUN_TIMEOUT_S} s)" if rc is None else
               f"crashed (signal {-rc})" if rc < 0 else f"failed (exit code {rc})")
        results[job["kernels"][started[-1]]["name"]] = f"{why}: {stderr[-500:]}"
        skip.append(started[-1])


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def check_schedules(schedules: list[Schedule], seed: int, workdir: Path,
                    workers: int | None = None) -> list[tuple[Schedule, str]]:
    """Build, run and compare every schedule; (schedule, what went wrong) for each failure."""
    target = cpu_target()
    failures: list[tuple[Schedule, str]] = []
    kernels = []
    for i, s in enumerate(schedules):
        try:
            kernels.append(render(s, target, name=f"fuzz_{i}"))
        except Exception as e:  # a legal schedule must render
            failures.append((s, f"render failed: {type(e).__name__}: {e}"))
            kernels.append(None)
    inputs = {}
    for i, (s, k) in enumerate(zip(schedules, kernels)):
        if k is not None:
            x = inputs_for(s, seed + i)
            path = workdir / f"in{i}.npz"
            np.savez(path, **x)
            inputs[i] = (x, path)
    todo = [i for i, k in enumerate(kernels) if k is not None]
    batches = [todo[j:j + KERNELS_PER_OBJECT] for j in range(0, len(todo), KERNELS_PER_OBJECT)]

    def one(b: int) -> tuple[list[int], str | None, dict]:
        idx = batches[b]
        obj = workdir / f"batch{b}.so"
        err = build([kernels[i].source for i in idx], obj)
        if err is not None:
            return idx, err, {}
        job = {"object": str(obj), "kernels": [
            {"name": kernels[i].name, "args": [t.name for t in kernels[i].args],
             "output": schedules[i].op.output.name, "inputs": str(inputs[i][1]),
             "shapes": {t.name: list(t.shape) for t in kernels[i].args}} for i in idx]}
        return idx, None, run_object(job, workdir)

    workers = workers or len(os.sched_getaffinity(0)) or 1
    with ThreadPoolExecutor(workers) as pool:
        for idx, err, results in pool.map(one, range(len(batches))):
            for i in idx:
                s = schedules[i]
                if err is not None:
                    failures.append((s, f"compile error in its batch: {err}"))
                    continue
                got = results.get(kernels[i].name)
                if got is None or isinstance(got, str):
                    failures.append((s, got or "no output"))
                    continue
                if kernels[i].name + ":wrote" in results:
                    failures.append((s, "wrote to an input"))
                    continue
                x = inputs[i][0]
                ref = reference(s.op.kind, s.op.shape, x)
                scale = max(float(np.abs(ref).max(initial=0.0)), 1.0)
                if not np.all(np.isfinite(got)):
                    failures.append((s, "NaN or inf in the output"))
                    continue
                worst = float(np.abs(got - ref).max(initial=0.0)) / scale
                if not worst <= TOLERANCE:
                    bad = int(np.sum(np.abs(got - ref) > TOLERANCE * scale))
                    failures.append((s, f"max error {worst:.2e} of the largest output; "
                                         f"{bad} of {ref.size} wrong"))
    return failures


def describe(schedule: Schedule, why: str) -> str:
    return f"{why}\n{json.dumps(schedule.to_json())}\n{print_loop_nest(schedule)}"


# ---------------------------------------------------------------- tests

def test_reference_is_the_definition():
    """The numpy reference against plain loops on a tiny strided, padded convolution."""
    rng = np.random.default_rng(0)
    for kind, shape in (("conv2d", (1, 2, 5, 4, 3, 3, 2, 2, 1)),
                        ("depthwise_conv2d", (2, 3, 5, 4, 3, 2, 2, 1))):
        x = {k: rng.standard_normal(v) for k, v in expected_shapes(kind, shape).items() if k != "O"}
        want = np.zeros(expected_shapes(kind, shape)["O"])
        stride, pad = shape[-2:]
        h, w = x["I"].shape[2:]
        for n, k, y, xx in np.ndindex(*want.shape):
            for c in range(x["I"].shape[1]):
                if kind == "depthwise_conv2d" and c != k:
                    continue
                for ry in range(x["W"].shape[2]):
                    for rx in range(x["W"].shape[3]):
                        iy, ix = y * stride + ry - pad, xx * stride + rx - pad
                        if 0 <= iy < h and 0 <= ix < w:
                            wt = x["W"][k, c, ry, rx] if kind == "conv2d" else x["W"][c, 0, ry, rx]
                            want[n, k, y, xx] += x["I"][n, c, iy, ix] * wt
        np.testing.assert_allclose(reference(kind, shape, x), want, rtol=1e-12, atol=1e-12)


def test_drawn_schedules_are_reproducible_and_varied():
    a = [f"{s.op.kind} {s.op.shape_str} {s.key()}" for s in draw_cases(40, SEED)]
    assert a == [f"{s.op.kind} {s.op.shape_str} {s.key()}" for s in draw_cases(40, SEED)]
    schedules = draw_cases(COUNT, SEED)
    used = {type(step).__name__ for s in schedules for step in s.steps}
    assert used >= {"Split", "Tile", "Reorder", "Fuse", "Vectorize", "Unroll", "Parallel",
                    "CacheWrite", "CacheRead"}, used
    assert {s.op.kind for s in schedules} == set(KINDS)
    convs = [s.op.shape for s in schedules if "conv" in s.op.kind]
    assert any(pad > 0 for *_, pad in convs) and any(stride > 1 for *_, stride, _ in convs)


def test_random_legal_schedules_match_the_definition(tmp_path):
    t0 = time.perf_counter()
    schedules = draw_cases(COUNT, SEED)
    failures = check_schedules(schedules, SEED, tmp_path)
    took = time.perf_counter() - t0
    print(f"fuzz: {len(schedules)} schedules checked in {took:.1f} s, {len(failures)} wrong")
    if failures:
        pytest.fail(f"{len(failures)} of {len(schedules)} schedules wrong; first ones:\n\n"
                    + "\n\n".join(describe(s, why) for s, why in failures[:5]))
