"""The search driver: pipelined batches measure the same records whatever the devices do."""

from __future__ import annotations

import random
import threading
import time
import zlib

import numpy as np
import pytest

from agents.evolution import search_evolve
from agents.rollout import RandomDraw, rollout
from agents.search import AGENTS, P_DONE, SLOW_FACTOR, Search
from envs.actions import ActionTable
from kernels.ir.ops import make_op
from kernels.ir.schedule import Schedule
from kernels.measure import BuildResult, Measurer, MeasureResult
from kernels.measure.tuning_log import TuningLog
from kernels.target import cpu_target

from test_evolution import _FakeMeasurer

OP = make_op("matmul", "32x32x32")


class _Builder:
    """Nothing is compiled: every kernel 'builds' to its digest."""

    def build(self, kernels):
        return [BuildResult(k.digest, None, 0.0) for k in kernels]


class _Devices:
    """``devices`` simulated runners: a kernel's time is a function of its source, and each
    run takes a random while, so kernels finish out of order and batches overlap."""

    concurrent = True

    def __init__(self, devices: int, delay_s: float = 0.0, seed: int = 0):
        self.free = threading.Semaphore(devices)
        self.delay_s, self.rng = delay_s, random.Random(seed)
        self.busy = self.most_busy = 0
        self.lock = threading.Lock()

    def _one(self, op, kernel):
        with self.free:
            with self.lock:
                self.busy += 1
                self.most_busy = max(self.most_busy, self.busy)
                delay = self.delay_s * (0.5 + 0.5 * self.rng.random())
            time.sleep(delay)
            with self.lock:
                self.busy -= 1
        digest = zlib.crc32(kernel.source.encode())
        if digest % 7 == 0:
            return MeasureResult.failure("wrong result: simulated")
        t = 0.1 + digest % 1000 / 100
        return MeasureResult(True, t, (t,), op.flops / t / 1e6, True, None)

    def run_many(self, op, jobs, library=False, slow_cutoff_s=None, rival=None):
        """Every job at once (as many as there are devices), results in order."""
        results = [None] * len(jobs)
        threads = [threading.Thread(target=lambda i=i, k=k: results.__setitem__(i, self._one(op, k)))
                   for i, (k, _) in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
            yield results[threads.index(t)]

    def close(self):
        pass


class _Model:
    """A stand-in cost model that learns: schedules it was told are fast rank first."""

    def __init__(self):
        self.seen: dict[str, float] = {}

    def predict(self, schedules):
        return np.array([self.seen.get(s.key(), -len(s.steps)) for s in schedules], dtype=float)

    def rank(self, schedules, k=None):
        return [int(i) for i in np.argsort(self.predict(schedules), kind="stable")[:k]]

    def update(self, pairs):
        self.seen.update((s.key(), t) for s, t in pairs)


def _small_evolve(search, rng, model):
    """The default search with a small population (the test's time goes into evolving)."""
    table, draw = ActionTable(OP, search.target), RandomDraw(rng, p_done=P_DONE)
    search_evolve(search, rng, model, lambda n: [rollout(OP, table, draw).schedule for _ in range(n)],
                  population=16, generations=2)


def _search(tmp_path, name: str, agent: str, pipeline: bool, devices: int, delay_s: float = 0.0, budget: int = 24):
    log = tmp_path / f"{name}.jsonl"
    with Measurer(cpu_target(), _Builder(), _Devices(devices, delay_s), log=log) as m:
        search = Search(OP, m.target, m, budget, pipeline=pipeline)
        agent_fn = _small_evolve if agent == "evolve" else AGENTS[agent]
        agent_fn(search, np.random.default_rng(3), model=_Model())
    return search, [(r.schedule, r.correct, r.time_ms) for r in TuningLog(log)]


@pytest.mark.parametrize("agent", ["random", "filtered"])
def test_a_pipelined_search_measures_what_the_unpipelined_one_does(tmp_path, agent):
    """Proposals that do not wait for results (random; filtered, whose model sees the same
    batches one later here) come out the same, record for record, on 1 or 3 devices."""
    one, one_log = _search(tmp_path, "one", agent, pipeline=False, devices=1)
    many, many_log = _search(tmp_path, "many", agent, pipeline=True, devices=3, delay_s=0.01)
    if agent == "random":
        assert many_log == one_log and list(many.measured) == list(one.measured)
        assert many.best.key() == one.best.key()
    assert len(many_log) == len(many.measured) == 24 and not many.pending


def test_a_pipelined_evolutionary_search_is_the_same_on_any_number_of_devices(tmp_path):
    """The default search, pipelined: kernels finishing in another order on 3 devices than on
    1 change nothing; records reach the log in the order they were proposed."""
    one, one_log = _search(tmp_path, "one", "evolve", pipeline=True, devices=1)
    many, many_log = _search(tmp_path, "many", "evolve", pipeline=True, devices=3, delay_s=0.1)
    assert many_log == one_log and len(one_log) == 24
    assert list(many.measured) == list(one.measured) and many.best.key() == one.best.key()
    assert [p.measurements for p in many.history] == list(range(1, 25))


def test_submitted_batches_share_the_devices(tmp_path):
    """Two batches in flight keep 4 devices busy where one batch of 2 would leave two idle."""
    runner = _Devices(4, delay_s=0.2)
    with Measurer(cpu_target(), _Builder(), runner, log=tmp_path / "log.jsonl") as m:
        search = Search(OP, m.target, m, 4, batch=2, pipeline=True)
        AGENTS["random"](search, np.random.default_rng(0))
    assert runner.most_busy >= 3 and len(search.measured) == 4


def test_each_search_measures_with_its_own_slow_cutoff():
    """Searches of several operators share a measurer and its runner (tune-model, teacher
    searches): each batch carries its own search's cutoff (ten times its best), none before
    a first result, whatever another search measured in between."""
    target = cpu_target()
    measurer = _FakeMeasurer(target)
    cutoffs = []
    measure = measurer.measure
    measurer.measure = lambda schedules, cutoff=None: cutoffs.append(cutoff) or measure(schedules)
    tiny = Search(make_op("matmul", "8x8x8"), target, measurer, budget=2)
    big = Search(make_op("matmul", "64x64x64"), target, measurer, budget=2)
    tiny.measure([Schedule(tiny.op)])
    big.measure([Schedule(big.op)])
    best_ms = tiny.best_result.time_ms
    tiny.measure([Schedule(tiny.op).split("i", 2)])
    assert cutoffs[:2] == [None, None]
    assert cutoffs[2] == pytest.approx(SLOW_FACTOR * best_ms / 1e3)


def test_the_first_batch_is_cut_off_by_the_kernels_timed_before_the_search():
    """A search's first batch is cut off by the naive or expert kernel timed before it (an
    expert-free GPU tune's first batch took 81 s of its 99 without); a faster best takes over."""
    target = cpu_target()
    measurer = _FakeMeasurer(target)
    cutoffs = []
    measure = measurer.measure
    measurer.measure = lambda schedules, cutoff=None: cutoffs.append(cutoff) or measure(schedules)
    search = Search(make_op("matmul", "64x64x64"), target, measurer, budget=2, reference_ms=1e6)
    search.measure([Schedule(search.op)])
    best_ms = search.best_result.time_ms
    search.measure([Schedule(search.op).split("i", 2)])
    assert cutoffs[0] == pytest.approx(SLOW_FACTOR * 1e6 / 1e3)
    assert cutoffs[1] == pytest.approx(SLOW_FACTOR * best_ms / 1e3)


def test_a_kernel_is_measured_once_whatever_steps_build_it():
    """A reorder and its undoing build the nest the steps before them built: the search
    knows that kernel as measured and spends no budget on it again."""
    base = Schedule(OP).split("i", 8).reorder("i_o", "j", "i_i", "k")
    detour = base.reorder("j", "i_o").reorder("i_o", "j")
    other = base.reorder("j", "i_o")
    assert detour.key() != base.key() and detour.kernel_key() == base.kernel_key() != other.kernel_key()
    search = Search(OP, cpu_target(), _FakeMeasurer(cpu_target()), budget=8)
    assert len(search.measure([base, detour, other])) == 2
    assert search.known(detour) and search.measure([detour]) == [] and search.left == 6


def test_kernels_timed_before_the_search_are_not_measured_again():
    """The naive and expert kernels `tune` timed before its search are known to it: a
    policy's greedy schedule that builds the expert's kernel costs no measurement."""
    expert = Schedule(OP).split("i", 8).reorder("i_o", "j", "i_i", "k")
    same = expert.reorder("j", "i_o").reorder("i_o", "j")
    search = Search(OP, cpu_target(), _FakeMeasurer(cpu_target()), budget=8,
                    references=frozenset({Schedule(OP).kernel_key(), expert.kernel_key()}))
    assert search.measure([same, Schedule(OP)]) == [] and search.left == 8
    assert len(search.measure([expert.reorder("j", "i_o")])) == 1
