"""Search agents under a budget of hardware measurements.

Every agent proposes candidate schedules and spends measurements through one
:class:`Search` driver, which measures each distinct schedule once, tracks the
best correct kernel and reports progress with the number of measurements as the
step, so curves of different agents compare directly. Agents:

- ``evolve`` (tune's default): evolutionary search guided by the cost model
  (``agents/evolution.py``), its population proposed by a trained policy's rollouts
  where there is one; otherwise sketches (``agents/sketch.py``: the structure of a fast
  CPU or GPU kernel, derived from the operator's axes) mixed with random rollouts.
- ``random``: random masked rollouts of the environment's actions.
- ``filtered``: random rollouts too, but only the cost model's predicted best of
  each batch are measured (and the model learns from them).
- ``anneal``: simulated annealing over action sequences guided by the cost model
  (AutoTVM's method): chains walk on predicted cost, the predicted-best unmeasured
  schedules are measured, the model is updated with the results.
- ``beam``: beam search over actions; the cost model ranks children, the top of each
  beam level is measured and fed back.
- ``ppo``: a trained policy's rollouts (sampled), ranked by the cost model, the
  top measured; zero-shot, no training on the shape. Budget 1 measures only its
  greedy schedule.

Seeded agents are deterministic given the same measurement results, so a search
resumed from its tuning log replays the measured part from the cache and goes on.

Candidates come from ``agents.rollout`` (random, policy or replayed rollouts of the
environment's actions); the cost model orders them with its ``rank``. A new agent is
one function ``search_NAME(search, rng, model=, policy=, **_)`` here, added to
:data:`AGENTS` (``tune --agent NAME`` then offers it).
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from envs import MAX_STEPS
from envs.actions import ActionTable, NestInfo
from kernels.measure import Measurer, MeasureResult
from kernels.ir.ops import Operator
from kernels.ir.schedule import Schedule
from kernels.target import Target

from .evolution import search_evolve
from .rollout import PolicyDraw, RandomDraw, Rollout, allowed, rollout
from .sketch import sketches

P_DONE = 0.05  # random candidates stop with this probability per step, wherever done is allowed
SLOW_FACTOR = 10  # kernels this much slower than the best so far are timed by two calls


@dataclass
class Progress:
    measurements: int
    best_gflops: float
    best_time_ms: float
    wall_s: float


@dataclass
class Search:
    """Measures schedules for one operator and remembers the best correct one.

    Agents hand it batches: ``measure`` waits for one; ``run`` loops over what a proposal
    function gives and, with ``pipeline``, proposes the next batch while the last one is
    measured (``Measurer.submit``), so a cluster's devices never wait for the driver. A
    pipelined batch is then proposed from what was learnt up to the batch before the one in
    flight: a model-guided search makes other choices than unpipelined, but the same ones
    whatever the number of devices and whichever kernel finishes first."""

    op: Operator
    target: Target
    measurer: Measurer
    budget: int
    on_progress: Callable[[Progress], None] | None = None
    batch: int = 8              # candidates proposed and measured at once
    pipeline: bool = False      # propose the next batch while this one is measured
    reference_ms: float | None = None  # the fastest kernel timed before the search (the naive, the expert)
    references: frozenset[str] = frozenset()  # their kernel keys: known, not measured again
    measured: dict[str, MeasureResult] = field(default_factory=dict)  # kernel key -> result
    schedules: dict[str, Schedule] = field(default_factory=dict)      # kernel key -> schedule
    pending: dict[str, Schedule] = field(default_factory=dict)        # submitted, not yet collected
    best: Schedule | None = None
    best_result: MeasureResult | None = None
    history: list[Progress] = field(default_factory=list)

    def __post_init__(self):
        self.t0 = time.perf_counter()

    @property
    def left(self) -> int:
        return self.budget - len(self.measured) - len(self.pending)

    def known(self, schedule: Schedule) -> bool:
        """Its kernel is measured, or being measured, or was timed before the search
        (:meth:`Schedule.kernel_key`): no agent should propose it again. A policy's greedy
        schedule is often the expert's kernel, which `tune` had timed already."""
        key = schedule.kernel_key()
        return key in self.measured or key in self.pending or key in self.references

    def measure(self, schedules: Sequence[Schedule]) -> list[tuple[Schedule, MeasureResult]]:
        """Measure the not-yet-measured ones among ``schedules`` (within the budget)."""
        batch = self.submit(schedules)
        return self.collect(batch) if batch else []

    def submit(self, schedules: Sequence[Schedule]) -> tuple[list[Schedule], Future] | None:
        """Start measuring the new ones among ``schedules`` (within the budget); None when
        there are none. Without ``pipeline`` they are measured here and now."""
        todo: dict[str, Schedule] = {}
        for s in schedules:
            k = s.kernel_key()
            if not self.known(s) and k not in todo and len(todo) < self.left:
                todo[k] = s
        if not todo:
            return None
        batch = list(todo.values())
        # this search's own cutoff, with the batch: searches of other operators share the runner;
        # from the first batch on (an expert-free GPU tune's first batch took 81 s of its 99 without)
        fastest = [t for t in (self.reference_ms, self.best_result and self.best_result.time_ms) if t]
        cutoff = SLOW_FACTOR * min(fastest) / 1e3 if fastest else None
        if self.pipeline:
            future = self.measurer.submit(batch, cutoff)
        else:
            future = Future()
            try:
                future.set_result(self.measurer.measure(batch, cutoff))
            except BaseException as e:
                future.set_exception(e)
        self.pending.update(todo)
        return batch, future

    def collect(self, submitted: tuple[list[Schedule], Future]) -> list[tuple[Schedule, MeasureResult]]:
        """Wait for a submitted batch and take its results in, in submission order."""
        batch, future = submitted
        try:
            results = future.result()
        finally:
            for s in batch:
                self.pending.pop(s.kernel_key(), None)
        for s, r in zip(batch, results):
            self.measured[s.kernel_key()], self.schedules[s.kernel_key()] = r, s
            if r.ok and (self.best_result is None or r.time_ms < self.best_result.time_ms):
                self.best, self.best_result = s, r
            p = Progress(len(self.measured), self.best_result.gflops if self.best_result else 0.0,
                         self.best_result.time_ms if self.best_result else math.inf,
                         time.perf_counter() - self.t0)
            self.history.append(p)
            if self.on_progress:
                self.on_progress(p)
        return list(zip(batch, results))

    def run(self, propose: Callable[[int], Sequence[Schedule]],
            learn: Callable[[list[tuple[Schedule, MeasureResult]]], None] | None = None,
            patience: int = 50) -> None:
        """Measure ``propose(n)``'s schedules (``n``: at most ``batch``) batch after batch
        until the budget is spent or ``patience`` proposals in a row bring nothing new;
        ``learn`` sees each batch's results, in order. With ``pipeline`` one more batch is
        in flight: batch k+1 is proposed before batch k's results are in."""
        depth = 2 if self.pipeline else 1
        flight: deque = deque()
        stale = 0
        while True:
            if self.left > 0 and stale < patience and len(flight) < depth:
                submitted = self.submit(propose(min(self.batch, self.left)))
                stale = 0 if submitted else stale + 1
                if submitted:
                    flight.append(submitted)
                continue
            if not flight:
                return
            pairs = self.collect(flight.popleft())
            if learn is not None:
                learn(pairs)


# ---------------------------------------------------------------- agents

def _feedback(model, pairs) -> None:
    if model is not None:
        model.update([(s, r.time_ms / 1e3) for s, r in pairs if r.ok])


def search_random(search: Search, rng: np.random.Generator, **_) -> None:
    table, explore = ActionTable(search.op, search.target), RandomDraw(rng, p_done=P_DONE)
    search.run(lambda n: [rollout(search.op, table, explore).schedule for _ in range(n)])


def search_anneal(search: Search, rng: np.random.Generator, model, chains: int = 8,
                  chain_steps: int = 20, temperature: float = 0.5, **_) -> None:
    """Simulated annealing on predicted log time; measure each round's predicted best."""
    table, explore = ActionTable(search.op, search.target), RandomDraw(rng, p_done=P_DONE)
    points = [rollout(search.op, table, explore) for _ in range(chains)]

    def propose(n: int) -> list[Schedule]:
        scores = model.predict([p.schedule for p in points])
        seen: dict[str, Schedule] = {}
        for step in range(chain_steps):
            t = temperature * (1 - step / chain_steps) + 1e-3
            proposals = [_mutate(search.op, table, p.actions, explore, rng) for p in points]
            new_scores = model.predict([p.schedule for p in proposals])
            for i, (p, ns) in enumerate(zip(proposals, new_scores)):
                if ns < scores[i] or rng.random() < math.exp((scores[i] - ns) / t):
                    points[i], scores[i] = p, ns
                seen.setdefault(p.schedule.kernel_key(), p.schedule)
        fresh = [s for s in seen.values() if not search.known(s)]
        # mostly exploit the model, keep a little exploration (AutoTVM's epsilon-greedy)
        n_explore = max(1, search.batch // 8)
        picks = [fresh[i] for i in model.rank(fresh, search.batch - n_explore)]
        return picks + [rollout(search.op, table, explore).schedule for _ in range(n_explore)]

    search.run(propose, lambda pairs: _feedback(model, pairs))


def _mutate(op: Operator, table: ActionTable, actions: list[int], draw: RandomDraw,
            rng: np.random.Generator) -> Rollout:
    """Keep a random prefix of the action sequence and roll out the rest anew."""
    cut = int(rng.integers(0, len(actions) + 1))
    return rollout(op, table, draw, prefix=actions[:cut])


def search_beam(search: Search, rng: np.random.Generator, model, beam_width: int = 8, per_level: int = 2,
                max_children: int = 64, **_) -> None:
    """Beam search over actions, ranked by the model; the top of every level is measured."""
    table = ActionTable(search.op, search.target)
    beam = [(Schedule(search.op), [])]
    for depth in range(MAX_STEPS - 1):
        if search.left <= 0 or not beam:
            break
        children = []
        for s, acts in beam:
            mask = allowed(table, NestInfo(search.op, s.nest), acts)
            mask[table.done] = False
            legal = np.flatnonzero(mask)
            if len(legal) > max_children:
                legal = rng.choice(legal, max_children, replace=False)
            for a in legal:
                children.append((s.apply(table.to_step(int(a), s.nest)), acts + [int(a)]))
        if not children:
            break
        beam = [children[i] for i in model.rank([c for c, _ in children], beam_width)]
        complete = [s for s, _ in beam if table.complete(NestInfo(search.op, s.nest))]
        _feedback(model, search.measure(complete[:per_level]))
    if search.left > 0:  # budget left after the deepest level: spend it like random search
        search_random(search, rng)


def search_filtered(search: Search, rng: np.random.Generator, model, candidates: int = 64, **_) -> None:
    """Cost-model filtering: of many random rollouts, measure only the predicted best."""
    table, explore = ActionTable(search.op, search.target), RandomDraw(rng, p_done=P_DONE)

    def propose(n: int) -> list[Schedule]:
        cands = [rollout(search.op, table, explore).schedule for _ in range(candidates)]
        cands = list({c.kernel_key(): c for c in cands if not search.known(c)}.values())
        return [cands[i] for i in model.rank(cands, n)]

    search.run(propose, lambda pairs: _feedback(model, pairs))


def search_policy(search: Search, rng: np.random.Generator, model, policy, samples: int = 64, **_) -> None:
    """Zero-shot: the greedy rollout first, then sampled ones ranked by the model."""
    import torch

    torch.manual_seed(int(rng.integers(2**31)))  # the policy samples with torch: seeded, it replays on resume
    table = ActionTable(search.op, search.target)
    search.measure([rollout(search.op, table, PolicyDraw(policy, deterministic=True)).schedule])
    sample = PolicyDraw(policy, deterministic=False)

    def propose(n: int) -> list[Schedule]:
        cands = [rollout(search.op, table, sample).schedule for _ in range(samples)]
        cands = list({c.kernel_key(): c for c in cands if not search.known(c)}.values())
        return [cands[i] for i in model.rank(cands, n)] if cands else []

    search.run(propose, lambda pairs: _feedback(model, pairs), patience=20)


SKETCH_SHARE = 0.75   # of the evolutionary search's proposals without a policy: sketches; the rest random rollouts
# with a policy: sketches beside its samples (structures it never proposes); on a GPU none
# until that mix is measured there
POLICY_SKETCH_SHARE = {"cpu": 0.5, "cuda": 0.0}


def search_evolution(search: Search, rng: np.random.Generator, model, policy=None, **_) -> None:
    """Ansor's evolutionary search (agents/evolution.py); a trained policy, where there is
    one, proposes (its greedy schedule measured first), on a CPU half of the population
    beside sketches (agents/sketch.py), which bring structures it never learned. Without
    one, sketches propose most of the population and random rollouts the rest (all of it
    where an operator has no sketch)."""
    table = ActionTable(search.op, search.target)
    sketched = SKETCH_SHARE if policy is None else POLICY_SKETCH_SHARE.get(search.target.kind, 0.0)
    if policy is None:
        draw = RandomDraw(rng, p_done=P_DONE)
    else:
        import torch

        torch.manual_seed(int(rng.integers(2**31)))  # seeded: a resumed search replays
        search.measure([rollout(search.op, table, PolicyDraw(policy, deterministic=True)).schedule])
        draw = PolicyDraw(policy, deterministic=False)

    def propose(n: int) -> list[Schedule]:
        drawn = sketches(search.op, search.target, rng, round(sketched * n))
        return drawn + [rollout(search.op, table, draw).schedule for _ in range(n - len(drawn))]

    search_evolve(search, rng, model, propose)


AGENTS = {"evolve": search_evolution, "random": search_random, "filtered": search_filtered, "anneal": search_anneal, "beam": search_beam,
          "ppo": search_policy}
