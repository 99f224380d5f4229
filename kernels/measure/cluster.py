"""Measure on a Ray cluster: compiles as Ray tasks, checking and timing in runner actors.

``backend(target)`` returns a builder/runner pair that a :class:`~kernels.measure.Measurer`
on the driver takes in place of the local :class:`~kernels.measure.Builder` and
:class:`~kernels.measure.Runner`; the records, the cache and the tuning log stay the
driver's, exactly as with the local backend.

- **Devices.** Each runner actor owns one device, asked for through Ray resources: a
  GPU (``num_gpus=1``) for CUDA kernels, or a whole CPU host for C kernels, which a
  machine offers as the custom resource ``cpu_host`` (``ray start ...
  --resources='{"cpu_host": 1}'``): timing wants all of a host's cores, which Ray's
  per-core ``CPU`` accounting cannot reserve without starving the compiles. An actor
  runs one kernel at a time, in the same replaceable worker process as the local
  Runner, so a crashing or hanging kernel costs a failed result there too.
- **Builds** are Ray tasks of one CPU each, spread over the nodes whose CPU model and
  compiler are the target's (``-march=native`` makes code for the CPU it compiles on).
  The shared object goes into Ray's object store; runners fetch it from there, and the
  driver keeps a copy in its build cache (for ``--export`` and later runs). CUDA source
  needs no build: NVRTC compiles it on the runner's GPU.
- **Failures.** A runner actor that dies mid-measurement (its process or its machine)
  costs that candidate one retry on another runner; a second loss records it as
  failed. The dead actor is replaced while its machine is alive.
- **Slow devices.** At start-up every runner times the same reference kernel a few
  times; a runner slower than the fastest by more than the timing spread (and 3%) is named in a
  warning and in ``RayRunner.slow`` (its timings would rank kernels unfairly).

Ray is imported here only, and only when a cluster is asked for (``--cluster``).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from ..codegen import render
from ..codegen.kernel import Kernel
from ..ir.ops import OPERATORS_ENV, Operator, make_op
from ..ir.schedule import Schedule
from ..target import NoCudaDevice, Target, cpu_target, cuda_devices, cuda_target
from .build import Builder, ObjectCache, default_cache_dir
from .result import BuildResult, MeasureResult, Rival
from .runner import Runner

logger = logging.getLogger(__name__)

CPU_HOST = "cpu_host"      # custom Ray resource: one unit per runner of C kernels on a machine
PROBE_TIMEOUT_S = 7.0      # a cluster address that does not answer within this fails (the command, in 10 s)
RETRIES = 1                # extra attempts of a candidate whose runner died
# the kernel every runner times at start-up (its naive schedule: legal on every target)
REFERENCE = {"cpu": ("matmul", "128x128x128"), "cuda": ("matmul", "512x512x512")}
REFERENCE_ROUNDS = 5
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # kernels/, shipped to the workers


class ClusterError(ConnectionError):
    """The cluster cannot be reached or cannot measure for the target (an OSError, so
    the command line reports it in one line)."""


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ClusterError(f"--cluster needs Ray ({e}); pip install -r requirements.txt") from None
    return ray


# ---------------------------------------------------------------- joining a cluster

def _probe(address: str) -> bool:
    """Fail within PROBE_TIMEOUT_S when nothing speaks gRPC at ``address`` (Ray's own
    connect retries for minutes against a wrong or dead address); True when the cluster
    wants a token (Ray's token authentication), which Ray would otherwise retry for 20 s."""
    host, port = _host_port(address)
    deadline = time.monotonic() + PROBE_TIMEOUT_S   # for both probes together
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise ClusterError(f"no Ray cluster at {address}: {e}; start one with `ray start --head` "
                           "and pass HEAD_IP:6379, or `auto` on a machine of the cluster") from None
    try:
        return _refuses(address, None, timeout=max(deadline - time.monotonic(), 0.1))
    except TimeoutError:
        raise ClusterError(f"no Ray cluster answers at {address} (nothing accepted a gRPC connection "
                           f"within {PROBE_TIMEOUT_S:g} s); start one with `ray start --head` and pass "
                           "HEAD_IP:6379, or `auto` on a machine of the cluster") from None


def _host_port(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--cluster {address!r} is not auto, local or HOST:PORT")
    return host, port


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _refuses(address: str, metadata: tuple | None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the cluster's GCS refuses a call with ``metadata`` as unauthenticated
    (TimeoutError when no gRPC server answers within ``timeout``)."""
    import grpc  # installed with Ray (and TensorBoard)

    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
        try:
            call(b"", timeout=timeout, metadata=metadata)   # an empty request is a valid one
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.UNAUTHENTICATED
        return False
    except grpc.FutureTimeoutError:
        raise TimeoutError(address) from None
    finally:
        channel.close()


def _use_token(address: str, loopback: bool) -> None:
    """Send the cluster its token. Ray sends one only with RAY_AUTH_MODE=token; for a head
    on this machine (a loopback address) it takes the token that head saved
    (~/.ray/auth_token, or $RAY_AUTH_TOKEN), as Ray does itself for ``auto``."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available)
    from ray._raylet import AuthenticationTokenLoader

    if os.environ.get("RAY_AUTH_MODE") != "token" and not (
            loopback and maybe_enable_token_auth_if_token_available(warn_if_disabled=False)):
        raise ClusterError(f"the Ray cluster at {address} wants its token: set RAY_AUTH_MODE=token and "
                           "RAY_AUTH_TOKEN to what `ray get-auth-token` prints on its head")
    loader = AuthenticationTokenLoader.instance()
    header = tuple(loader.get_token_for_http_header().items()) if loader.has_token() else ()
    if _refuses(address, header):
        raise ClusterError(f"the Ray cluster at {address} refuses this machine's token: set RAY_AUTH_TOKEN "
                           "to what `ray get-auth-token` prints on its head")


def connect(address: str, *, num_cpus: int | None = None, cpu_hosts: int = 1,
            num_gpus: int | None = None) -> None:
    """Join the Ray cluster at ``address``: ``auto`` (the cluster this machine belongs to,
    or ``$RAY_ADDRESS``), ``HOST:PORT`` of its head, or ``local``: a throwaway cluster
    on this machine, bound to the loopback address, offering ``num_cpus`` CPUs for
    compiles, ``cpu_hosts`` CPU runners and ``num_gpus`` of its GPUs (default: all; the
    first K that CUDA_VISIBLE_DEVICES shows), one runner each. Keeps an existing connection.

    A loopback ``HOST`` is joined through the loopback address: Ray swaps it for the
    machine's LAN address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 when Ray is imported."""
    if num_gpus is not None:
        _check_gpus(address, num_gpus)
    wants_token = False
    loopback = address == "local"
    if address not in ("auto", "local"):
        wants_token = _probe(address)
        loopback = _loopback(_host_port(address)[0])
    if loopback:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = _ray()
    if ray.is_initialized():
        return
    if wants_token:
        _use_token(address, loopback)
    # Workers on other machines import this package from the cluster, not from a checkout;
    # operators of your own load there from the same paths ($SCHEDGYM_OPERATORS)
    runtime_env = {"py_modules": [str(PACKAGE_DIR)]}
    if os.environ.get(OPERATORS_ENV):
        runtime_env["env_vars"] = {OPERATORS_ENV: os.environ[OPERATORS_ENV]}
    common = dict(log_to_driver=False, runtime_env=runtime_env)
    try:
        if address == "local":
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, resources={CPU_HOST: cpu_hosts},
                     include_dashboard=False, **common)
        else:
            ray.init(address=address, **common)
    except Exception as e:
        hint = "; start one with `ray start --head`, or use --cluster local" if address == "auto" else ""
        raise ClusterError(f"cannot join the Ray cluster at {address}: {type(e).__name__}: {e}{hint}") from None


def _check_gpus(address: str, num_gpus: int) -> None:
    """``--gpus K`` asks a local cluster for K of this machine's GPUs: there must be K."""
    if address != "local":
        raise ClusterError(f"--gpus {num_gpus} sets the GPUs of a cluster started here: use it with --cluster local "
                           "(a running cluster's GPUs are those its machines offer)")
    if num_gpus < 1:
        raise ValueError(f"--gpus must be at least 1, not {num_gpus}")
    try:
        have = cuda_devices()
    except NoCudaDevice as e:
        raise ClusterError(f"--gpus {num_gpus} needs CUDA GPUs on this machine: {e}") from None
    if num_gpus > have:
        raise ClusterError(f"--gpus {num_gpus}: this machine shows {have} CUDA GPU{'s' * (have != 1)}")


def disconnect() -> None:
    """Leave the cluster (and stop it if ``connect("local")`` started it)."""
    ray = _ray()
    if ray.is_initialized():
        ray.shutdown()


# ---------------------------------------------------------------- remote code

def _same_target(a: dict, b: Target) -> bool:
    """Code built or timed there is valid for ``b``: same kind, device and compiler."""
    return (a.get("kind"), a.get("device"), a.get("compiler")) == (b.kind, b.device, b.compiler)


def _describe_node() -> dict:
    """This machine's CPU target: what code compiled here is for."""
    return cpu_target().to_json()


_builder: Builder | None = None


OTHER_CPU = "this node compiles for another CPU"


def _build(kernel: Kernel, timeout_s: float, want: dict) -> tuple[BuildResult, bytes | None]:
    """Compile on this node (its own build cache); the result and the shared object. A node
    whose CPU or compiler is not ``want``'s (one that joined later, say) declines."""
    global _builder
    if not _same_target(want, cpu_target()):
        return BuildResult(None, OTHER_CPU, 0.0), None
    if _builder is None or _builder.timeout_s != timeout_s:
        _builder = Builder(workers=1, timeout_s=timeout_s)
    res = _builder.build([kernel])[0]
    return res, Path(res.path).read_bytes() if res.ok else None


class _RunnerActor:
    """Owns one device and times one kernel at a time on it, through a local Runner."""

    def __init__(self, kind: str, options: dict):
        if kind == "cpu":
            # Ray caps OpenMP (and OpenBLAS) at the CPUs an actor asked for; a CPU runner
            # owns the whole host, as the local Runner does.
            os.environ.pop("OMP_NUM_THREADS", None)
        self.kind = kind
        self.runner = Runner(**options)
        try:
            self.cache = ObjectCache(default_cache_dir())
        except OSError:
            self.cache = ObjectCache(Path(tempfile.mkdtemp(prefix="schedgym-artefacts-")))

    def describe(self) -> tuple[str, dict, str]:
        """Its node, its target, and a name for people: the node's address and the GPU it
        was given (CUDA_VISIBLE_DEVICES, set by Ray), or the process of a CPU runner."""
        import ray

        target = cuda_target() if self.kind == "cuda" else cpu_target()
        ip = ray.util.get_node_ip_address()
        where = f"GPU {','.join(map(str, ray.get_gpu_ids()))}" if self.kind == "cuda" else f"CPU, pid {os.getpid()}"
        return ray.get_runtime_context().get_node_id(), target.to_json(), f"{ip} {where}"

    def run(self, kind: str, shape: str, kernel: Kernel, filename: str, data: bytes, library: bool,
            slow_cutoff_s: float | None, dtype: str = "fp32", rival_kernel: Kernel | None = None,
            rival_file: str = "", rival_data: bytes = b"", pairs: int = 0, budget_s: float = 0.0) -> MeasureResult:
        rival = rival_kernel and Rival(rival_kernel, self._stored(rival_file, rival_data), pairs, budget_s)
        return self.runner.run(make_op(kind, shape, dtype), kernel, self._stored(filename, data), library,
                               slow_cutoff_s, rival)

    def _stored(self, filename: str, data: bytes) -> str:
        """The path of a shipped object in this node's cache, stored there on first use."""
        return str(self.cache.get(filename) or self.cache.put(filename, data))

    def close(self) -> None:
        self.runner.close()


_remote: dict[str, Any] = {}


def _remotes() -> dict[str, Any]:
    """The Ray task and actor class, made once (declaring them needs Ray)."""
    if not _remote:
        ray = _ray()
        _remote["describe"] = ray.remote(num_cpus=0)(_describe_node)
        _remote["build"] = ray.remote(num_cpus=1, num_returns=2)(_build)
        _remote["runner"] = ray.remote(max_restarts=0)(_RunnerActor)
    return _remote


def _pin(node_id: str) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def _alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in _ray().nodes())


# ---------------------------------------------------------------- the builder

class RayBuilder:
    """``Builder.build`` on the cluster's CPUs: one Ray task per distinct source, wherever
    a CPU is free when every node compiles for the target, else pinned round robin to the
    nodes that do; results land in this machine's build cache too."""

    def __init__(self, target: Target, nodes: list[tuple[str, int]], artefacts: dict[str, Any],
                 timeout_s: float = 60.0, anywhere: bool = False):
        self.target = target
        self.local = Builder(timeout_s=timeout_s)   # paths, cache hits, and CUDA sources
        self.timeout_s = timeout_s
        self.nodes = nodes                            # (node id, CPUs) that compile for the target
        self.anywhere = anywhere                      # every node does: let Ray place the compiles
        self.workers = sum(c for _, c in nodes) or 1  # compiles that can run at once
        # round robin over nodes, each as often as it has CPUs
        self._next = itertools.cycle([n for n, c in nodes for _ in range(max(c, 1))] or [None])
        self._artefacts = artefacts                   # local path -> object ref of the .so (shared with the runner)
        self._lock = threading.Lock()
        self.compiles = 0
        self.artefact_bytes = 0                       # bytes of shared objects built, over all builds

    def build(self, kernels: list[Kernel]) -> list[BuildResult]:
        if self.target.kind != "cpu" or not self.nodes:
            return self.local.build(kernels)  # CUDA: the source is the artefact
        ray = _ray()
        unique = {k.digest: k for k in kernels}
        done: dict[str, BuildResult] = {}
        pending: dict[str, tuple[Kernel, Any, Any, int]] = {}
        for d, k in unique.items():
            path = self.local.cache.get(self.local.object_name(k))
            if path is not None:
                done[d] = BuildResult(str(path), None, 0.0, cached=True)
            else:
                pending[d] = (k, *self._submit(k), 0)
        for d, (k, res_ref, data_ref, tries) in pending.items():
            pinned = False
            while True:
                try:
                    res = ray.get(res_ref)
                    if res.error != OTHER_CPU or pinned:
                        break
                    pinned = True    # once more, on a node known to compile for the target
                    res_ref, data_ref = self._submit(k, pin=True)
                except ray.exceptions.RayError as e:  # the build's worker or node was lost
                    if tries >= RETRIES:
                        res = BuildResult(None, f"build lost: {type(e).__name__}", 0.0)
                        break
                    tries += 1
                    res_ref, data_ref = self._submit(k)
            done[d] = self._land(k, res, data_ref)
        return [done[k.digest] for k in kernels]

    def _submit(self, kernel: Kernel, pin: bool = False) -> tuple[Any, Any]:
        with self._lock:
            node = None if self.anywhere and not pin else next(self._next)
            self.compiles += 1
        build = _remotes()["build"]
        if node is not None:
            build = build.options(scheduling_strategy=_pin(node))
        return build.remote(kernel, self.timeout_s, self.target.to_json())

    def _land(self, kernel: Kernel, res: BuildResult, data_ref: Any) -> BuildResult:
        """The remote result with this machine's path; the object is copied here."""
        if not res.ok:
            return res
        name = self.local.object_name(kernel)
        data = _ray().get(data_ref)
        path = self.local.cache.get(name) or self.local.cache.put(name, data)
        with self._lock:
            self._artefacts[str(path)] = data_ref
            self.artefact_bytes += len(data)
        return replace(res, path=str(path))


# ---------------------------------------------------------------- the runner

class RayRunner:
    """``Runner`` over every matching device of the cluster: ``run_many`` keeps each
    runner actor busy with one kernel at a time and yields results in order. Several
    ``run_many`` at once (batches a pipelined search submitted) share the devices: a
    free one takes the next kernel of whichever asked first."""

    concurrent = True                          # Measurer.submit may run batches side by side

    def __init__(self, target: Target, artefacts: dict[str, Any], **options: Any):
        self.target = target
        self.options = options                 # for each actor's local Runner
        self._artefacts = artefacts            # local path -> object ref of its bytes
        self._cond = threading.Condition()
        self._idle: list[Any] = []
        self._live: list[Any] = []
        self.runs = 0
        self.retries = 0                       # candidates re-run after their runner died
        self.replaced = 0                      # runner actors started in place of dead ones
        self.dispatch_s = 0.0                  # wall time of runner calls beyond the actors' own run time
        self._node_of: dict[Any, str] = {}     # actor -> the node it runs on
        self.name_of: dict[Any, str] = {}      # actor -> "node address GPU i" (for people)
        self.reference: list[dict] = []        # per runner: the reference kernel's times (calibrate)
        self.slow: list[str] = []              # names of runners slower than the spread allows
        self._start()

    @property
    def devices(self) -> int:
        return len(self._live)

    def busy(self) -> list[Any]:
        """The runner actors measuring a kernel now."""
        with self._cond:
            return [a for a in self._live if a not in self._idle]

    def _new_actor(self, node: str | None = None) -> Any:
        res = dict(num_cpus=0, num_gpus=1) if self.target.kind == "cuda" else \
            dict(num_cpus=0, resources={CPU_HOST: 1})
        if node is not None:
            res["scheduling_strategy"] = _pin(node)
        return _remotes()["runner"].options(**res).remote(self.target.kind, self.options)

    def _start(self) -> None:
        ray = _ray()
        what = "GPU" if self.target.kind == "cuda" else CPU_HOST
        n = int(ray.cluster_resources().get(what, 0))
        if n < 1:
            raise ClusterError(
                f"the Ray cluster offers no {what} to time {self.target.kind} kernels on"
                + ("" if what == "GPU" else
                   f"; start the machines that should time them with "
                   f"`ray start ... --resources='{{\"{CPU_HOST}\": 1}}'`"))
        actors = [self._new_actor() for _ in range(n)]
        try:
            found = ray.get([a.describe.remote() for a in actors], timeout=300)
        except Exception as e:
            for a in actors:
                ray.kill(a)
            raise ClusterError(f"runner actors failed to start: {type(e).__name__}: {e}") from None
        wrong = []
        for a, (node, tgt, name) in zip(actors, found):
            if _same_target(tgt, self.target):
                self._live.append(a)
                self._node_of[a] = node
                self.name_of[a] = name
            else:
                wrong.append(f"{tgt.get('device')} ({tgt.get('compiler')})")
                ray.kill(a)
        if not self._live:
            raise ClusterError(f"no device of the Ray cluster is the target {self.target.device} "
                               f"({self.target.compiler}); it has: {', '.join(sorted(set(wrong)))}")
        if wrong:
            logger.warning("%d runners skipped, not the target: %s", len(wrong), ", ".join(sorted(set(wrong))))
        self._idle = list(self._live)

    # ------------------------------------------------------------ dispatch
    def _take(self, block: bool) -> Any | None:
        """An idle runner; waits for one when ``block``; None when none is free (or left)."""
        with self._cond:
            while block and not self._idle and self._live:
                self._cond.wait()
            return self._idle.pop(0) if self._idle else None

    def _give_back(self, actor: Any) -> None:
        with self._cond:
            if actor in self._live:
                self._idle.append(actor)
                self._cond.notify()

    def _lost(self, actor: Any) -> None:
        """Forget a dead runner; start another in its place while its machine lives."""
        ray = _ray()
        try:
            ray.kill(actor)  # unreachable is as good as dead: free its device
        except Exception:
            pass
        node = self._node_of.pop(actor, None)
        name = self.name_of.pop(actor, "?")
        fresh = None
        if node is not None and _alive(node) and self.replaced < 4 * max(len(self._live), 1):
            fresh = self._new_actor(node if self.target.kind == "cpu" else None)
        with self._cond:
            if actor in self._live:
                self._live.remove(actor)
            if fresh is not None:
                self.replaced += 1
                self._node_of[fresh] = node
                self.name_of[fresh] = f"{name} (restarted)"
                self._live.append(fresh)
                self._idle.append(fresh)
            self._cond.notify_all()

    def _artefact(self, path: str) -> Any:
        ref = self._artefacts.get(path)
        if ref is None:  # built here (a cache hit, or CUDA source): ship the file
            ref = self._artefacts[path] = _ray().put(Path(path).read_bytes())
        return ref

    def run(self, op: Operator, kernel: Kernel, path: str, library: bool = False,
            slow_cutoff_s: float | None = None, rival: Rival | None = None) -> MeasureResult:
        return next(iter(self.run_many(op, [(kernel, path)], library, slow_cutoff_s, rival)))

    def run_many(self, op: Operator, jobs: list[tuple[Kernel, str]], library: bool = False,
                 slow_cutoff_s: float | None = None, rival: Rival | None = None) -> Iterator[MeasureResult]:
        """Results in the order of ``jobs``, each yielded once it and those before it are in;
        ``rival`` as for :meth:`Runner.run`, beside every job."""
        ray = _ray()
        lost_errors = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        cutoff = None if library else slow_cutoff_s
        shipped = (rival.kernel, Path(rival.path).name, self._artefact(rival.path), rival.pairs,
                   rival.budget_s) if rival else ()
        queue = list(range(len(jobs)))
        tries = [0] * len(jobs)
        inflight: dict[Any, tuple[int, Any, float]] = {}  # ref -> (job, actor, submitted at)
        results: dict[int, MeasureResult] = {}
        nxt = 0
        try:
            while nxt < len(jobs):
                while queue:
                    actor = self._take(block=not inflight)
                    if actor is None:
                        break
                    i = queue.pop(0)
                    kernel, path = jobs[i]
                    ref = actor.run.remote(op.kind, op.shape_str, kernel, Path(path).name,
                                           self._artefact(path), library, cutoff, op.dtype, *shipped)
                    inflight[ref] = (i, actor, time.perf_counter())
                if not inflight:  # no runner left at all
                    for i in queue:
                        results[i] = MeasureResult.failure("no runner left in the cluster")
                    queue.clear()
                else:
                    [ref], _ = ray.wait(list(inflight), num_returns=1)
                    i, actor, t0 = inflight.pop(ref)
                    try:
                        res = ray.get(ref)
                        self._give_back(actor)
                        with self._cond:
                            self.runs += 1
                            self.dispatch_s += max(time.perf_counter() - t0 - res.run_s - res.build_s, 0.0)
                        results[i] = res
                    except lost_errors as e:
                        self._lost(actor)
                        if tries[i] < RETRIES:
                            tries[i] += 1
                            self.retries += 1
                            queue.insert(0, i)   # next free runner: another one
                            logger.warning("runner lost during a measurement (%s); retrying it", type(e).__name__)
                        else:
                            results[i] = MeasureResult.failure(f"runner lost twice: {type(e).__name__}")
                    except ray.exceptions.RayError as e:
                        self._give_back(actor)
                        results[i] = MeasureResult.failure(f"cluster error: {type(e).__name__}: {e}"[:300])
                while nxt in results:
                    yield results.pop(nxt)
                    nxt += 1
        finally:
            for ref, (_, actor, _) in inflight.items():  # abandoned (the caller stopped): let them finish
                threading.Thread(target=self._settle, args=(ref, actor), daemon=True).start()

    def calibrate(self, op: Operator, kernel: Kernel, path: str, rounds: int = REFERENCE_ROUNDS) -> list[dict]:
        """Every runner times ``kernel`` in ``rounds`` rounds (before any measuring), all GPU
        runners at once in each, CPU runners in turn. Per runner: its name, median, spread
        (max - min over the rounds) and whether it is slow: its median above the fastest
        runner's by more than the spread of either (and by more than ``SLOW_FLOOR``).
        Identical devices agree within the spread; a slower one (another model, a lower
        clock, a throttled or shared GPU) times every kernel slow, which bends the search's
        ranking; it is named in a warning and in ``slow``."""
        ray = _ray()
        actors = list(self._live)
        data = self._artefact(path)
        times: dict[Any, list[float]] = {a: [] for a in actors}
        errors: dict[Any, str] = {}

        def run(a: Any) -> Any:
            return a.run.remote(op.kind, op.shape_str, kernel, Path(path).name, data, False, None, op.dtype)

        # GPUs all at once; CPU runners one after another, since several may share a
        # host's cores (and real-time threads of two workers on them can stall each other)
        together = self.target.kind == "cuda"
        for _ in range(rounds):
            live = [a for a in actors if a not in errors]
            refs = {a: run(a) for a in live} if together else {}
            for a in live:
                try:
                    res = ray.get(refs[a] if together else run(a))
                except ray.exceptions.RayError as e:
                    res = MeasureResult.failure(f"{type(e).__name__}")
                if res.ok:
                    times[a].append(res.time_ms)
                else:
                    errors[a] = res.error or "failed"
        named = {self.name_of.get(a, "?"): t for a, t in times.items() if t and a not in errors}
        self.slow = slow_runners(named)
        self.reference = [{"runner": self.name_of.get(a, "?"),
                           "median_ms": statistics.median(t) if t and a not in errors else None,
                           "spread_ms": max(t) - min(t) if t and a not in errors else None,
                           "times_ms": t, "slow": self.name_of.get(a, "?") in self.slow, "error": errors.get(a)}
                          for a, t in times.items()]
        for r in self.reference:
            if r["error"]:
                logger.warning("runner %s failed the reference kernel %s %s: %s", r["runner"], op.kind,
                               op.shape_str, r["error"])
        if self.slow:
            fastest = min((r for r in self.reference if r["median_ms"] is not None), key=lambda r: r["median_ms"])
            logger.warning("slow runner%s: %s (reference %s %s: %s ms against %.4f ms on %s, spread %.4f ms)",
                           "s" * (len(self.slow) > 1), ", ".join(self.slow), op.kind, op.shape_str,
                           ", ".join(f"{r['median_ms']:.4f}" for r in self.reference if r["slow"]),
                           fastest["median_ms"], fastest["runner"], fastest["spread_ms"])
        return self.reference

    def _settle(self, ref: Any, actor: Any) -> None:
        ray = _ray()
        try:
            ray.get(ref)
            self._give_back(actor)
        except ray.exceptions.RayError:
            self._lost(actor)

    def close(self) -> None:
        ray = _ray()
        with self._cond:
            actors, self._live, self._idle = list(self._live), [], []
            self._cond.notify_all()
        if not ray.is_initialized():
            return
        for a in actors:
            try:
                ray.kill(a)
            except Exception:
                pass

    def __enter__(self) -> "RayRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SLOW_FLOOR = 0.03   # a runner within 3% of the fastest is never called slow: a steady kernel's
                    # spread can be far below the few per cent two identical devices differ by


def slow_runners(times: dict[str, list[float]]) -> list[str]:
    """The runners (by name) whose median time of one kernel is above the fastest
    runner's by more than the spread (max - min) of either's times, and by more than
    ``SLOW_FLOOR`` of the fastest median."""
    figures = {n: (statistics.median(t), max(t) - min(t)) for n, t in times.items() if t}
    if len(figures) < 2:
        return []
    m0, s0 = min(figures.values())
    return [n for n, (m, s) in figures.items() if m - m0 > max(s, s0, SLOW_FLOOR * m0)]


# ---------------------------------------------------------------- the pair

@dataclass
class RayBackend:
    """What ``Measurer(target, backend.builder, backend.runner)`` takes, and how many
    candidates the cluster can work on at once."""

    builder: RayBuilder
    runner: RayRunner

    @property
    def parallelism(self) -> int:
        """Candidates in flight that keep the cluster busy: a compile per build CPU (C),
        or a kernel per GPU (CUDA compiles on the runner)."""
        if self.runner.target.kind == "cuda":
            return self.runner.devices
        return max(self.builder.workers, self.runner.devices)

    @property
    def pipelined(self) -> bool:
        """Whether a search should propose its next batch while this one is measured: on
        GPUs (CUDA events time the device; the driver's work and NVRTC are on the host). A
        CPU runner's host may be the driver's or a compile's, and timing wants it quiet."""
        return self.runner.target.kind == "cuda"

    def summary(self) -> dict:
        """What a command's --json says of the cluster: its devices and each runner's time
        of the reference kernel."""
        kind, shape = REFERENCE[self.runner.target.kind]
        return {"devices": self.runner.devices, "reference": f"{kind} {shape} naive",
                "runners": self.runner.reference, "slow": self.runner.slow}

    def calibrate(self, rounds: int = REFERENCE_ROUNDS) -> list[dict]:
        """The reference kernel (``REFERENCE``, naive schedule) timed on every runner:
        :meth:`RayRunner.calibrate`."""
        op = make_op(*REFERENCE[self.runner.target.kind])
        kernel = render(Schedule(op), self.runner.target, name=f"{op.kind}_reference")
        built = self.builder.build([kernel])[0]
        if not built.ok:
            raise ClusterError(f"the reference kernel does not build: {built.error}")
        return self.runner.calibrate(op, kernel, built.path, rounds)


def backend(target: Target, build_timeout_s: float = 60.0, **runner_options: Any) -> RayBackend:
    """A builder/runner pair on the connected cluster (:func:`connect` first) for
    ``target``; ``runner_options`` are :class:`~kernels.measure.Runner`'s."""
    ray = _ray()
    if not ray.is_initialized():
        raise ClusterError("not connected to a Ray cluster; call kernels.measure.cluster.connect first")
    artefacts: dict[str, Any] = {}
    nodes: list[tuple[str, int]] = []
    # as the local Measurer: a GPU kernel that needs 30 s to compile and run is hopeless
    runner_options.setdefault("timeout_s", 30.0 if target.kind == "cuda" else 60.0)
    if target.kind == "cpu":
        alive = {n["NodeID"]: int(n["Resources"].get("CPU", 0)) for n in ray.nodes()
                 if n["Alive"] and n["Resources"].get("CPU", 0) >= 1}
        describe = _remotes()["describe"]
        found = ray.get([describe.options(scheduling_strategy=_pin(n)).remote() for n in alive], timeout=120)
        nodes = [(n, cpus) for (n, cpus), tgt in zip(alive.items(), found) if _same_target(tgt, target)]
        if not nodes:
            raise ClusterError(f"no node of the Ray cluster compiles for {target.device} ({target.compiler})")
    runner = RayRunner(target, artefacts, **runner_options)
    pair = RayBackend(RayBuilder(target, nodes, artefacts, timeout_s=build_timeout_s,
                                 anywhere=bool(nodes) and len(nodes) == len(alive)), runner)
    try:
        pair.calibrate()
    except BaseException:
        runner.close()
        raise
    return pair


def join(address: str, target: Target, gpus: int | None = None, **runner_options: Any) -> RayBackend:
    """What ``--cluster ADDRESS [--gpus K]`` does: :func:`connect` (a local cluster with
    ``gpus`` of this machine's GPUs), then :func:`backend`."""
    if gpus is not None and target.kind != "cuda":
        raise ValueError(f"--gpus is for --target cuda (this is --target {target.kind})")
    connect(address, num_gpus=gpus)
    return backend(target, **runner_options)
