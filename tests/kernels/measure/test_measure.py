import math
import os
import re
import subprocess
import statistics
import time

import pytest

from kernels.codegen.kernel import Kernel
from kernels.measure import Builder, Candidate, MeasureResult, Measurer, Runner
from kernels.measure.build import CacheDirError
from kernels.ir.ops import make_op
from kernels.target import cpu_target
from kernels.measure.tuning_log import TuningLog
from kernels.measure.result import Rival
from kernels.measure.runner import SLOW_GRACE_S

OP = make_op("matmul", "8x8x8")

HEADER = """
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
void {name}(float* restrict A, float* restrict B, float* restrict C) {{
"""

MATMUL = """
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 8; j++) {
            float acc = 0.0f;
            for (int k = 0; k < 8; k++) acc += A[i * 8 + k] * B[k * 8 + j];
            C[i * 8 + j] = acc;
        }
"""


def kernel(body: str, name: str = "f") -> Kernel:
    return Kernel(name, HEADER.format(name=name) + body + "}\n", OP.tensors)


GOOD = kernel(MATMUL)
SEGV = kernel("*(volatile float*)0 = 1.0f;" + MATMUL)
ABORT = kernel("abort();")
LOOP = kernel("volatile int x = 0; for (;;) x++;")
ZEROS = kernel("for (int i = 0; i < 64; i++) C[i] = 0.0f;")
NOTHING = kernel("(void)A; (void)B; (void)C;")
WRITES_INPUT = kernel(MATMUL + "A[0] = 42.0f;")
BROKEN = kernel("this is not C;")
SLOW = kernel("usleep(100000);" + MATMUL)
# Correct only when the worker set OMP_STACKSIZE before loading the kernel.
NEEDS_STACKSIZE = kernel('const char* s = getenv("OMP_STACKSIZE"); if (!s || strcmp(s, "16M")) return;'
                         + MATMUL)


def key(i: int) -> list:
    return [["tile", "i", i]]


@pytest.fixture
def builder(tmp_path):
    return Builder(cache_dir=tmp_path / "build")


@pytest.fixture
def runner():
    r = Runner(timeout_s=10, min_time_s=0.05)
    yield r
    r.close()


@pytest.fixture
def measurer(builder, runner):
    return Measurer(cpu_target(), builder=builder, runner=runner)


def test_correct_kernel(measurer):
    r = measurer.measure_one(Candidate(OP, key(0), GOOD))
    assert r.ok and r.correct and r.error is None
    assert 3 <= len(r.times_ms) <= 10
    assert r.time_ms == statistics.median(r.times_ms)
    assert r.gflops == pytest.approx(OP.flops / (r.time_ms / 1e3) / 1e9)
    assert r.gflops > 0 and r.build_s > 0 and r.run_s > 0


def test_segfault_then_next_kernel_measures(measurer, runner):
    bad, good = measurer.measure([Candidate(OP, key(1), SEGV), Candidate(OP, key(2), GOOD)])
    assert not bad.ok and not bad.correct and math.isinf(bad.time_ms) and bad.gflops == 0
    assert bad.error == "crashed (signal 11)"
    assert good.ok
    assert runner.workers_started == 2


def test_abort_is_a_crash(measurer):
    r = measurer.measure_one(Candidate(OP, key(3), ABORT))
    assert not r.ok and r.error == "crashed (signal 6)"


def test_infinite_loop_times_out(builder):
    with Runner(timeout_s=2, min_time_s=0.05) as runner:
        m = Measurer(cpu_target(), builder=builder, runner=runner)
        t0 = time.monotonic()
        loop, good = m.measure([Candidate(OP, key(4), LOOP), Candidate(OP, key(5), GOOD)])
        assert time.monotonic() - t0 < 8
        assert not loop.ok and loop.error == "timeout after 2s"
        assert good.ok


def test_a_timeout_is_measured_again_not_remembered(builder, tmp_path):
    """A loaded machine can time a kernel out: the log keeps the attempt, but neither the
    cache nor a resumed run takes it as the kernel's result."""
    log = tmp_path / "log.jsonl"
    with Runner(timeout_s=1, min_time_s=0.05) as runner:
        m = Measurer(cpu_target(), builder=builder, runner=runner, log=log)
        assert m.measure_one(Candidate(OP, key(4), LOOP)).transient
        assert m.measure_one(Candidate(OP, key(4), LOOP)).transient and m.measured == 2
    assert len(log.read_text().splitlines()) == 2
    assert Measurer(cpu_target(), builder=builder, log=log).cache == {}


@pytest.mark.parametrize("k, what", [(ZEROS, "wrong result: max err"),
                                     (NOTHING, "wrong result: NaN"),
                                     (WRITES_INPUT, "wrong result: kernel wrote to input A")])
def test_wrong_result(measurer, k, what):
    r = measurer.measure_one(Candidate(OP, key(6), k))
    assert not r.ok and not r.correct and r.times_ms == ()
    assert r.error.startswith(what)


def test_compile_error_is_not_run(measurer, runner):
    r = measurer.measure_one(Candidate(OP, key(7), BROKEN))
    assert not r.ok and r.error.startswith("compile error") and "error" in r.error[14:]
    assert runner.runs == 0


def test_slow_kernel_stops_after_three_calls(builder):
    with Runner(timeout_s=10, repeats=10, min_time_s=0.2) as runner:
        r = Measurer(cpu_target(), builder=builder, runner=runner).measure_one(Candidate(OP, key(8), SLOW))
    assert r.ok and len(r.times_ms) == 3 and r.time_ms >= 100
    assert r.run_s < 2


COLD_START = kernel("static int calls; if (!calls++) usleep(20000);" + MATMUL)


def test_a_kernel_slow_only_on_its_first_call_is_timed(measurer):
    """The slow cutoff judges by a second call when the first (the check, run cold) is past
    it: a kernel whose first call alone is slow is timed like any other, and one slow on
    every call is given up after two calls."""
    r = measurer.measure_one(Candidate(OP, key(41), COLD_START), slow_cutoff_s=5e-3)
    assert r.ok and len(r.times_ms) >= 3 and r.time_ms < 5
    r = measurer.measure_one(Candidate(OP, key(42), kernel("usleep(20000);" + MATMUL, name="s")), slow_cutoff_s=5e-3)
    assert r.ok and len(r.times_ms) == 1 and r.time_ms >= 20


def test_a_hopeless_kernel_is_not_waited_for(builder):
    """With a slow cutoff (a search's best so far), a kernel that runs far past it is given
    up after SLOW_GRACE_S, not after the whole timeout."""
    with Runner(timeout_s=30, min_time_s=0.05) as runner:
        t0 = time.monotonic()
        r = Measurer(cpu_target(), builder=builder, runner=runner).measure_one(Candidate(OP, key(40), LOOP),
                                                                                 slow_cutoff_s=1e-3)
        assert time.monotonic() - t0 < SLOW_GRACE_S + 5
    assert not r.ok and r.error == f"timeout after {SLOW_GRACE_S + 0.1:g}s"


class _EndlessCompile:
    """A CUDA worker stand-in: its inputs are ready at once, its compile never ends."""

    def __init__(self, env):
        self.messages, self.killed = [{"event": "ready", "realtime": True}], False

    def alive(self):
        return not self.killed

    def send(self, request):
        self.messages.append({"event": "compiling"})

    def recv(self, deadline):
        if self.messages:
            return self.messages.pop(0)
        time.sleep(max(0.0, deadline - time.monotonic()))
        raise TimeoutError

    def kill(self):
        self.killed = True


def test_a_search_gives_up_a_compile_past_its_limit(monkeypatch):
    """NVRTC took 12 s on candidates 40x slower than a search's best: with a search's
    cutoff the compile gets SLOW_COMPILE_S, a failure measured again if asked (transient);
    without one, the runner's whole timeout."""
    import types

    from kernels.measure import runner as runner_module
    monkeypatch.setattr(runner_module, "_Worker", _EndlessCompile)
    monkeypatch.setattr(runner_module, "SLOW_COMPILE_S", 0.2)
    kernel = types.SimpleNamespace(name="k", args=(), is_cuda=True, launch=((1, 1, 1), (1, 1, 1)), shared_bytes=0)
    with Runner(timeout_s=30) as runner:
        t0 = time.monotonic()
        r = runner.run(OP, kernel, "k.cu", slow_cutoff_s=1e-3)
        assert time.monotonic() - t0 < 5
    assert not r.ok and r.error.startswith("compile timeout") and r.transient
    with Runner(timeout_s=0.5) as runner:
        r = runner.run(OP, kernel, "k.cu")
    assert r.error == "timeout after 0.5s" and r.transient


def test_worker_sets_omp_stacksize(measurer):
    assert measurer.measure_one(Candidate(OP, key(9), NEEDS_STACKSIZE)).ok


def test_identical_schedule_measured_once(measurer, builder, runner):
    k = {"steps": [1, 2], "a": 0}
    same = {"a": 0, "steps": [1, 2]}   # same schedule, keys in another order
    first = measurer.measure([Candidate(OP, k, GOOD), Candidate(OP, same, GOOD), Candidate(OP, k, GOOD)])
    again = measurer.measure_one(Candidate(OP, same, GOOD))
    assert builder.compiles == 1 and runner.runs == 1 and measurer.measured == 1
    assert first[0] == first[1] == first[2] == again


def test_same_source_compiled_once_on_disk(tmp_path, runner):
    b1 = Builder(cache_dir=tmp_path)
    (r1,) = b1.build([GOOD])
    b2 = Builder(cache_dir=tmp_path)
    r2, r3 = b2.build([GOOD, GOOD])
    assert not r1.cached and r2.cached and r2.path == r1.path == r3.path
    assert b1.compiles == 1 and b2.compiles == 0


def test_replaced_cached_object_is_not_loaded(tmp_path, runner):
    """A shared object swapped in the cache (here: one whose constructor touches a file)
    does not match the digest recorded at build time: it is rebuilt, never loaded."""
    (first,) = Builder(cache_dir=tmp_path).build([GOOD])
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.c"
    evil.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void p(void) '
                    f'{{ fopen("{marker}", "w"); }}\nvoid f(float* A, float* B, float* C) {{}}\n')
    subprocess.run(["gcc", "-shared", "-fPIC", str(evil), "-o", first.path], check=True)
    builder = Builder(cache_dir=tmp_path)
    (again,) = builder.build([GOOD])
    assert not again.cached and builder.compiles == 1
    assert runner.run(OP, GOOD, again.path).ok
    assert not marker.exists()


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_cache_dir_others_can_write_is_refused(tmp_path, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(CacheDirError, match="written by others"):
        Builder(cache_dir=shared)


def test_cache_dir_of_another_user_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(CacheDirError, match="another user"):
        Builder(cache_dir=tmp_path)


def test_parallel_build_keeps_order(builder):
    ks = [kernel(MATMUL, name=f"f{i}") for i in range(4)] + [BROKEN]
    res = builder.build(ks)
    assert [r.ok for r in res] == [True] * 4 + [False]
    assert len({r.path for r in res[:4]}) == 4 and builder.compiles == 5


def test_log_records_and_preloads_cache(tmp_path, builder, runner):
    log = TuningLog(tmp_path / "logs" / "tune.jsonl")
    m = Measurer(cpu_target(), builder=builder, runner=runner, log=log)
    good, bad = m.measure([Candidate(OP, key(10), GOOD), Candidate(OP, key(11), ZEROS)])
    records = log.read()
    assert [r.schedule for r in records] == [[["tile", "i", 10]], [["tile", "i", 11]]]
    assert records[0].correct and records[0].time_ms == good.time_ms
    assert not records[1].correct and records[1].error == bad.error

    runs = runner.runs
    m2 = Measurer(cpu_target(), builder=builder, runner=runner, log=log)
    good2, bad2 = m2.measure([Candidate(OP, key(10), GOOD), Candidate(OP, key(11), ZEROS)])
    assert runner.runs == runs and m2.measured == 0
    assert good2.ok and good2.time_ms == good.time_ms and good2.times_ms == good.times_ms
    assert not bad2.ok and bad2.error == bad.error
    assert len(log.read()) == 2


def test_cache_off_measures_again(builder, runner):
    m = Measurer(cpu_target(), builder=builder, runner=runner, cache=False)
    m.measure_one(Candidate(OP, key(12), GOOD))
    m.measure_one(Candidate(OP, key(12), GOOD))
    assert runner.runs == 2 and builder.compiles == 1


def test_failure_value():
    r = MeasureResult.failure("timeout after 1s")
    assert not r.ok and math.isinf(r.time_ms) and r.gflops == 0 and r.times_ms == ()


# ---------------------------------------------------------------- a check that cannot be gamed

def test_worker_draws_a_fresh_seed_unless_given():
    with Runner() as a, Runner() as b, Runner(seed=7) as c:
        assert a.seed != b.seed and c.seed == 7


def test_inputs_differ_between_seeds(builder):
    """A kernel that returns the answer for one seed's inputs (a table of seed 0's
    results) is right for that seed only."""
    import numpy as np

    ref = OP.reference(OP.random_inputs(np.random.default_rng(0))).ravel()
    table = "static const float R[64] = {" + ", ".join(f"{x!r}f" for x in ref.tolist()) + "};"
    memorised = kernel(table + "(void)A; (void)B; for (int i = 0; i < 64; i++) C[i] = R[i];")
    for seed, ok in ((0, True), (1, False)):
        with Runner(timeout_s=10, min_time_s=0.01, seed=seed) as runner:
            m = Measurer(cpu_target(), builder=builder, runner=runner)
            r = m.measure_one(Candidate(OP, key(20), memorised))
            assert r.ok == ok, r.error


# Right on the first call, then returns at once: the output still holds the first
# call's answer, so only a refilled output shows it.
IDLE = kernel("static int calls; if (calls++) return;" + MATMUL)
# Right every time, but from the second call on one element (which, the counter decides)
# is one ulp off: within tolerance, but not what the first call gave.
FLIP = "{ union { float f; unsigned u; } x = { C[n % 64] }; x.u ^= 1u; C[n % 64] = x.f; }"
NONDETERMINISTIC = kernel("static unsigned n; n++;" + MATMUL + "if (n > 1) " + FLIP)


def test_right_once_then_idle_fails_on_a_timed_call(measurer, runner):
    r = measurer.measure_one(Candidate(OP, key(21), IDLE))
    assert not r.ok and not r.correct and r.times_ms == () and r.gflops == 0
    assert re.fullmatch(r"wrong result on timed call \d+: NaN or inf in output.*", r.error), r.error


def test_timed_call_drawn_at_random(builder):
    """Which timed call is verified changes from kernel to kernel (10 calls to draw from)."""
    seen = set()
    with Runner(timeout_s=10, min_time_s=0.01, repeats=10) as runner:
        m = Measurer(cpu_target(), builder=builder, runner=runner, cache=False)
        for _ in range(12):
            seen.add(m.measure_one(Candidate(OP, key(22), IDLE)).error.split(":")[0])
    assert len(seen) >= 3, seen


def test_nondeterministic_output_fails(measurer):
    r = measurer.measure_one(Candidate(OP, key(23), NONDETERMINISTIC))
    assert not r.ok and not r.correct
    assert re.fullmatch(r"nondeterministic output: timed call (\d+) differs from the first call "
                        r"in 1 element\(s\), first at \[\d, \d\]", r.error), r.error


@pytest.mark.parametrize("name, index, side", [("C", "-1", "before the start"), ("C", "64", "after the end"),
                                               ("A", "-1", "before the start"), ("A", "64", "after the end"),
                                               ("B", "-1", "before the start"), ("B", "64", "after the end")])
def test_write_out_of_bounds_fails_and_replaces_the_worker(measurer, runner, name, index, side):
    bad = kernel(MATMUL + f"{name}[{index}] = 1.0f;")
    r = measurer.measure_one(Candidate(OP, key(24), bad))
    assert not r.ok and not r.correct and r.error == f"wrote out of bounds of {name} ({side})"
    assert measurer.measure_one(Candidate(OP, key(25), GOOD)).ok
    assert runner.workers_started == 2   # not the worker whose heap the kernel may have hit


def test_write_out_of_bounds_on_a_later_call_fails(measurer):
    """Margins are checked again after the verified timed call; a write on any call before it shows."""
    bad = kernel("static int calls;" + MATMUL + "if (calls++) C[64] = 0.0f;")
    r = measurer.measure_one(Candidate(OP, key(26), bad))
    assert not r.ok and re.fullmatch(r"wrote out of bounds of C \(after the end\) on timed call \d+", r.error)


LONG = make_op("matmul", "8x8x512")     # one product is a small part of each output


def long_kernel(loop: str, name: str = "f") -> Kernel:
    body = ("for (int i = 0; i < 8; i++) for (int j = 0; j < 8; j++) {"
            f"float acc = 0.0f; {loop} C[i * 8 + j] = acc; }}")
    return Kernel(name, HEADER.format(name=name) + body + "}\n", LONG.tensors)


def test_tolerance_rejects_a_dropped_term_and_accepts_another_order(builder, runner):
    m = Measurer(cpu_target(), builder=builder, runner=runner)
    forward = "for (int k = 0; k < 512; k++) acc += A[i * 512 + k] * B[k * 8 + j];"
    # backwards, in four interleaved partial sums added at the end: another rounding
    backward = ("float s[4] = {0, 0, 0, 0}; for (int k = 511; k >= 0; k--) s[k % 4] += "
                "A[i * 512 + k] * B[k * 8 + j]; acc = (s[0] + s[2]) + (s[1] + s[3]);")
    dropped = "for (int k = 0; k < 511; k++) acc += A[i * 512 + k] * B[k * 8 + j];"  # off by one
    results = m.measure([Candidate(LONG, key(30 + i), long_kernel(loop))
                         for i, loop in enumerate((forward, backward, dropped))])
    assert [r.ok for r in results] == [True, True, False], [r.error for r in results]
    assert results[2].error.startswith("wrong result: max err")


def test_verified_call_is_not_timed_with_its_fill():
    """The NaN fill before the verified call and the check after it run outside its clock."""
    from kernels.measure.timing import Rejected, VerifiedCall, time_calls

    events = []

    def clock(call):
        events.append("start")
        call()
        events.append("stop")
        return 1.0

    v = VerifiedCall(1, lambda: events.append("fill"), lambda call: events.append(call))
    assert time_calls(lambda: events.append("call"), 3, 3, 0.0, v.clock(clock)) == [1.0] * 3
    assert events == ["start", "call", "stop", "fill", "start", "call", "stop", "timed call 2",
                      "start", "call", "stop"]
    v.finish(lambda: events.append("extra"))
    assert "extra" not in events and "fill" not in events[7:]   # verified already: no extra call

    # timing stopped before the drawn call: one more call, untimed, is verified
    events.clear()
    v = VerifiedCall(5, lambda: events.append("fill"), lambda call: f"wrong on {call}")
    assert time_calls(lambda: events.append("call"), 1, 10, 0.0, v.clock(clock)) == [1.0]
    with pytest.raises(Rejected, match=r"wrong on call 2 \(after timing\)"):
        v.finish(lambda: events.append("extra"))
    assert events == ["start", "call", "stop", "fill", "extra"]



SLOWER = kernel("usleep(2000);" + MATMUL, name="g")


def _built(builder, k: Kernel) -> str:
    built = builder.build([k])[0]
    assert built.ok, built.error
    return built.path


def test_a_rival_is_timed_call_by_call_beside_the_kernel(builder, runner):
    """Pairs of calls in turn: as many rival samples as the kernel's, and the ratio within
    each pair shows which of the two is faster."""
    r = runner.run(OP, GOOD, _built(builder, GOOD), rival=Rival(SLOWER, _built(builder, SLOWER)))
    assert r.ok and len(r.rival_times_ms) == len(r.times_ms) >= 3
    assert statistics.median(s / k for k, s in zip(r.times_ms, r.rival_times_ms)) > 10


@pytest.mark.parametrize("rival, what", [(kernel("for (int i = 0; i < 64; i++) C[i] = 0.0f;", name="z"),
                                          "the rival kernel is wrong: wrong result"),
                                         (kernel("static int calls; if (calls++) return;" + MATMUL, name="i"),
                                          "the rival kernel is wrong: wrong result on timed call")])
def test_a_wrong_rival_fails_the_run(builder, runner, rival, what):
    """The rival is checked like the kernel: on its first call, and on a timed call drawn at random."""
    r = runner.run(OP, GOOD, _built(builder, GOOD), rival=Rival(rival, _built(builder, rival)))
    assert not r.ok and what in r.error, r.error


def test_a_measurer_paired_with_a_rival_records_times_in_its_units(builder, runner, tmp_path):
    """Paired with a copy of the kernel said to take 5 ms, the kernel takes about 5 ms:
    its time is its calls' over the rival's beside them, in the rival's units."""
    twin = kernel(MATMUL, name="twin")
    m = Measurer(cpu_target(), builder=builder, runner=runner, log=tmp_path / "log.jsonl")
    m.pair_with(OP, Rival(twin, _built(builder, twin)), 5.0)
    r = m.measure_one(Candidate(OP, key(50), GOOD))
    # a call of well under a microsecond: each pair's ratio moves by up to 40% with the clock's
    # own cost (a clean run read 3.26), where plain times are 10^4 smaller
    assert r.ok and 2.5 < r.time_ms < 10 and r.time_ms == statistics.median(r.times_ms)
    assert TuningLog(tmp_path / "log.jsonl").read()[0].time_ms == r.time_ms
    m.pair_with(OP, None)
    assert m.measure_one(Candidate(OP, key(51), GOOD)).time_ms < 1   # plain times again


def test_a_paired_ratio_is_the_median_of_its_runs():
    """One run in which a kernel ran slow (fresh buffers each run) does not decide."""
    from kernels.measure.comparison import PAIRED_RUNS, paired_ratio

    class Runs:
        def __init__(self, ratios):
            self.ratios, self.calls = list(ratios), 0

        def run(self, op, kernel, path, rival=None):
            self.calls += 1
            r = self.ratios.pop(0)
            return MeasureResult(True, 1.0, (1.0, 1.0, 1.0), 1.0, True, None, rival_times_ms=(r, r, r))

    op, k = make_op("matmul", "8x8x8"), Kernel("k", "", ())
    runner = Runs([0.8, 1.09, 1.08])
    assert PAIRED_RUNS == 3 and paired_ratio(runner, op, (k, "a.so"), (k, "b.so")) == 1.08 and runner.calls == 3
    failing = Runs([1.1])
    failing.run = lambda *a, **kw: MeasureResult.failure("crashed")
    assert paired_ratio(failing, op, (k, "a.so"), (k, "b.so")) is None
