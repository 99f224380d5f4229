"""The Ray measurement backend on a throwaway one-machine cluster (loopback only)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kernels.measure import cluster
from kernels.codegen.kernel import Kernel
from kernels.measure import Builder, Candidate, Measurer, Runner
from kernels.ir.ops import make_op
from kernels.target import cpu_target
from kernels.measure.tuning_log import TuningLog

ROOT = Path(__file__).resolve().parents[3]
FAST = dict(timeout_s=30, repeats=1, warmup=0, min_time_s=0.0)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local cluster for the module: 2 CPUs for compiles, 2 CPU runners; its workers
    build into a private cache (they inherit SCHEDGYM_CACHE)."""
    saved = os.environ.get("SCHEDGYM_CACHE")
    os.environ["SCHEDGYM_CACHE"] = str(tmp_path_factory.mktemp("ray-cache"))
    cluster.connect("local", num_cpus=2, cpu_hosts=2)
    import ray

    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]  # loopback only
    yield
    cluster.disconnect()
    if saved is None:
        os.environ.pop("SCHEDGYM_CACHE", None)
    else:
        os.environ["SCHEDGYM_CACHE"] = saved


def _random_search(measurer: Measurer, budget: int):
    from agents.search import Search, search_random

    op = make_op("matmul", "16x24x20")
    search = Search(op, measurer.target, measurer, budget)
    search_random(search, np.random.default_rng(7))
    return search


def _content(log: TuningLog) -> list[tuple]:
    """What must not depend on where a kernel was measured (times do)."""
    return [(r.op, r.shape, r.target, r.hardware, r.compiler, json.dumps(r.schedule), r.correct, r.error)
            for r in log]


def test_ray_search_matches_the_local_backend(ray_cluster, tmp_path):
    target = cpu_target()
    with Measurer(target, Builder(cache_dir=tmp_path / "local-build"), Runner(**FAST),
                  log=tmp_path / "local.jsonl") as m:
        local = _random_search(m, 12)
    backend = cluster.backend(target, **FAST)
    assert backend.runner.devices == 2 and backend.builder.workers == 2
    with Measurer(target, backend.builder, backend.runner, log=tmp_path / "ray.jsonl") as m:
        remote = _random_search(m, 12)
    assert backend.builder.compiles >= 1 and backend.runner.runs == 12  # it really went through Ray
    assert list(remote.measured) == list(local.measured)
    assert [r.ok for r in remote.measured.values()] == [r.ok for r in local.measured.values()]
    assert any(r.ok for r in remote.measured.values())
    assert _content(TuningLog(tmp_path / "ray.jsonl")) == _content(TuningLog(tmp_path / "local.jsonl"))


def _sleepy(name: str, sleep: str) -> Kernel:
    """A correct matmul 8x8x8 that first sleeps ``sleep`` (C: microseconds)."""
    return Kernel(name, f"""
#include <stdio.h>
#include <unistd.h>
void {name}(float* restrict A, float* restrict B, float* restrict C) {{
    usleep({sleep});
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 8; j++) {{
            float acc = 0.0f;
            for (int k = 0; k < 8; k++) acc += A[i * 8 + k] * B[k * 8 + j];
            C[i * 8 + j] = acc;
        }}
}}
""", make_op("matmul", "8x8x8").tensors)


SLEEPY = _sleepy("sleepy", "1500000")


def test_a_runner_killed_mid_measurement_loses_no_record(ray_cluster, tmp_path):
    import ray

    backend = cluster.backend(cpu_target(), **FAST)
    log = TuningLog(tmp_path / "tuning.jsonl")
    killed = []

    def kill_the_busy_one():
        deadline = time.monotonic() + 60
        while not backend.runner.busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        for actor in backend.runner.busy():
            ray.kill(actor)
            killed.append(actor)

    with Measurer(cpu_target(), backend.builder, backend.runner, log=log) as m:
        killer = threading.Thread(target=kill_the_busy_one)
        killer.start()
        res = m.measure_one(Candidate(make_op("matmul", "8x8x8"), "sleepy", SLEEPY))
        killer.join()
        assert len(killed) == 1
        assert res.ok, res.error          # retried on the other runner
        assert backend.runner.retries == 1
        assert backend.runner.devices == 2  # the dead runner was replaced
        assert [(r.schedule, r.correct) for r in log] == [("sleepy", True)]
        # and the run goes on: a search after the loss measures its whole budget
        search = _random_search(m, 6)
    assert len(search.measured) == 6 and len(log.read()) == 7


def test_a_bad_address_fails_fast_and_names_it():
    t0 = time.monotonic()
    with pytest.raises(cluster.ClusterError, match="127.0.0.1:1"):
        cluster.connect("127.0.0.1:1")
    with pytest.raises(cluster.ClusterError, match="not auto, local or HOST:PORT"):
        cluster.connect("nowhere")
    assert time.monotonic() - t0 < 15


def test_a_silent_address_fails_within_the_probe_deadline():
    """Something accepts TCP but speaks no gRPC: both probes share one deadline."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        t0 = time.monotonic()
        with pytest.raises(cluster.ClusterError, match="nothing accepted a gRPC connection"):
            cluster.connect(f"127.0.0.1:{listener.getsockname()[1]}")
        assert time.monotonic() - t0 < cluster.PROBE_TIMEOUT_S + 1


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCHEDGYM_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_bad_cluster_is_one_error_line(tmp_path):
    proc = cli("tune", "--op", "matmul", "--shape", "8x8x8", "--agent", "random", "--cluster", "127.0.0.1:1",
               cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no Ray cluster at 127.0.0.1:1")
    assert not (tmp_path / "runs").exists()  # failed before making a run directory


@pytest.fixture
def loopback_head(tmp_path):
    """A head started apart from the command, on the loopback address only
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray keep --node-ip-address=127.0.0.1), with
    Ray's default token authentication and its token in a file of its own; yields its
    address and the build cache its workers use."""
    import shutil
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths are bounded
    token = tmp_path / "token"
    token.write_text("0123456789abcdef" * 4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               SCHEDGYM_CACHE=str(tmp_path / "head-cache"))
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=1", f"--resources={{\"{cluster.CPU_HOST}\": 1}}", "--include-dashboard=false",
                             f"--temp-dir={temp}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (temp / "ray_current_cluster").exists() and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if head.poll() is not None or not (temp / "ray_current_cluster").exists():
            pytest.skip(f"ray cannot start a head here: {head.stdout.read()[-500:] if head.poll() is not None else 'timeout'}")
        yield f"127.0.0.1:{port}", tmp_path / "head-cache", token
    finally:
        head.terminate()   # `ray start --block` stops what it started
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            head.kill()
        head.stdout.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_loopback_address_joins_a_loopback_head_with_its_token(loopback_head, tmp_path, monkeypatch):
    """Ray swaps a loopback address for the LAN one, where this head does not listen, and
    sends no token to an address it is given; both would fail the command."""
    address, head_cache, token = loopback_head
    assert cluster._probe(address)  # the head wants a token
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(cluster.ClusterError, match="wants its token: set RAY_AUTH_MODE=token"):
        cluster._use_token(address, loopback=False)  # another machine's token is not guessed
    code = ("import sys; from experiments.cli import main; rc = main(sys.argv[1:]); import ray; "
            "print('GCS', ray.get_runtime_context().gcs_address, [n['NodeManagerAddress'] for n in ray.nodes()]); "
            "sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(ROOT), SCHEDGYM_CACHE=str(tmp_path / "cache"), RAY_AUTH_TOKEN_PATH=str(token),
               RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", code, "bench", "--op", "matmul", "--shape", "16x16x16", "--rounds", "1",
                           "--cluster", address],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"GCS {address} ['127.0.0.1']" in proc.stdout
    assert list(head_cache.rglob("*.so"))  # compiled by the head's workers


def test_without_cluster_ray_is_not_imported(tmp_path):
    code = ("import sys; from experiments.cli import main; "
            "rc = main(['tune', '--op', 'matmul', '--shape', '8x8x8', '--agent', 'random', '--budget', '1', "
            "'--rounds', '1']); "
            "assert rc == 0 and 'ray' not in sys.modules, sorted(m for m in sys.modules if 'ray' in m)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCHEDGYM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_train_on_the_cluster_steps_envs_side_by_side(ray_cluster, tmp_path):
    from experiments import train

    out = train.run(train.Config(op="matmul", shapes="small", timesteps=32, n_steps=16, batch_size=16,
                                 imitation_epochs=0, runs=str(tmp_path / "runs"), cluster="local"))
    assert out["n_envs"] == 2 and out["timesteps"] >= 32
    records = TuningLog(Path(out["run_dir"]) / "tuning.jsonl").read()
    assert len(records) == out["measurements"] >= 2
    assert all(r.correct for r in records if not r.schedule)  # the naive kernels


def test_a_node_of_another_cpu_declines_to_compile(ray_cluster, tmp_path):
    """A node that does not compile for the target (one that joined later) declines; the
    build is sent once more to a known node, and fails rather than loops."""
    import dataclasses

    import ray

    from kernels.measure.cluster import OTHER_CPU, RayBuilder

    other = dataclasses.replace(cpu_target(), device="another CPU")
    node = ray.get_runtime_context().get_node_id()
    builder = RayBuilder(other, [(node, 2)], {}, anywhere=True)
    builder.local = Builder(cache_dir=tmp_path)  # nothing cached
    good = Kernel("g", "void g(float* A, float* B, float* C) { C[0] = A[0] * B[0]; }\n",
                  make_op("matmul", "8x8x8").tensors)
    [res] = builder.build([good])
    assert not res.ok and res.error == OTHER_CPU and builder.compiles == 2


def test_tune_on_the_cluster_exports_the_best_kernel(ray_cluster, tmp_path):
    from experiments import tune

    out = tune.run(tune.Config(op="matmul", shape="16x24x8", agent="random", budget=3, runs=str(tmp_path / "runs"),
                               export=str(tmp_path / "k"), cluster="local", rounds=1))
    assert out["correct"] and out["measurements"] == 3 and out["fraction_of_library"]
    assert out["fraction_of_expert"] >= 1.0
    # the naive and expert kernels, then 3 others (the search knows the two: none measured twice)
    assert len(TuningLog(Path(out["run_dir"]) / "tuning.jsonl").read()) == 5
    assert (tmp_path / "k" / "kernel.so").stat().st_size > 0


def test_a_rival_travels_with_its_kernel_to_a_runner(ray_cluster, tmp_path):
    """A kernel timed in turn with a rival on a Ray runner: both objects shipped, both timed."""
    from kernels.codegen import render
    from kernels.experts import expert_schedule
    from kernels.ir.schedule import Schedule
    from kernels.measure.result import Rival

    target, op = cpu_target(), make_op("matmul", "16x24x20")
    backend = cluster.backend(target, **FAST)
    naive, expert = render(Schedule(op), target, name="naive"), render(expert_schedule(op, target), target, name="expert")
    built = Builder(cache_dir=tmp_path / "build").build([naive, expert])
    r = backend.runner.run(op, naive, built[0].path, rival=Rival(expert, built[1].path))
    assert r.ok and len(r.rival_times_ms) == len(r.times_ms) >= 1


def test_batches_submitted_together_share_the_runners(ray_cluster, tmp_path):
    """A second batch starts on the free runner while the first still measures, and its
    record waits behind the first one's in the log."""
    backend = cluster.backend(cpu_target(), **FAST)
    op = make_op("matmul", "8x8x8")
    busy, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            busy.append(len(backend.runner.busy()))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with Measurer(cpu_target(), backend.builder, backend.runner, log=tmp_path / "log.jsonl") as m:
            first = m.submit([Candidate(op, "slow", _sleepy("slow", "600000"))])
            second = m.submit([Candidate(op, "quick", _sleepy("quick", "100000"))])
            assert second.result()[0].ok and not first.done()   # the quick one did not wait
            assert first.result()[0].ok
    finally:
        stop.set()
        watcher.join()
    assert max(busy) == 2
    assert [r.schedule for r in TuningLog(tmp_path / "log.jsonl")] == ["slow", "quick"]


def test_slow_runners_are_those_beyond_the_spread():
    assert cluster.slow_runners({"a": [1.0, 1.1, 1.05], "b": [1.08, 1.12, 1.02]}) == []
    assert cluster.slow_runners({"a": [1.0, 1.1, 1.05], "b": [1.3, 1.31, 1.29], "c": [1.0]}) == ["b"]
    assert cluster.slow_runners({"a": [1.0]}) == []
    # steady timings: 0.2% apart is beyond the spread but within the floor, 5% is not
    assert cluster.slow_runners({"a": [10.10, 10.099, 10.11], "b": [10.12, 10.121, 10.119]}) == []
    assert cluster.slow_runners({"a": [10.10, 10.099, 10.11], "b": [10.6, 10.61, 10.59]}) == ["b"]


def test_identical_runners_agree_and_a_slower_one_is_named(ray_cluster, tmp_path, caplog):
    """Every runner times one kernel; both simulated runners agree within the spread until
    one of them (its worker's parent process marked) sleeps 60 ms longer per call."""
    marks = tmp_path / "slow"
    marks.mkdir()
    kernel = _sleepy("marked", f"""10000);
    char path[512];
    snprintf(path, sizeof path, "%s/%d", "{marks}", (int)getppid());
    if (access(path, F_OK) == 0) usleep(60000""")
    backend = cluster.backend(cpu_target(), **FAST)
    runner = backend.runner
    assert len(runner.reference) == 2 and all(r["median_ms"] for r in runner.reference)  # at start-up
    [built] = Builder(cache_dir=tmp_path / "build").build([kernel])
    op = make_op("matmul", "8x8x8")
    even = runner.calibrate(op, kernel, built.path, rounds=5)
    assert runner.slow == [] and not any(r["slow"] for r in even), even
    slow_name = even[1]["runner"]
    (marks / slow_name.rsplit("pid ", 1)[1]).touch()
    with caplog.at_level("WARNING", logger="kernels.measure.cluster"):
        uneven = runner.calibrate(op, kernel, built.path, rounds=3)
    assert runner.slow == [slow_name] and [r["slow"] for r in uneven] == [False, True], uneven
    assert uneven[1]["median_ms"] > uneven[0]["median_ms"] + 45
    assert any("slow runner: " + slow_name in r.getMessage() for r in caplog.records)
    assert backend.summary()["slow"] == [slow_name] and backend.summary()["devices"] == 2
    runner.close()


def test_gpus_need_a_local_cluster_and_the_gpus(monkeypatch):
    """``--gpus K`` is checked before anything starts, each way it can be wrong in one line."""
    with pytest.raises(cluster.ClusterError, match="use it with --cluster local"):
        cluster.connect("auto", num_gpus=2)
    with pytest.raises(ValueError, match="--gpus is for --target cuda"):
        cluster.join("local", cpu_target(), gpus=2)
    monkeypatch.setattr(cluster, "cuda_devices", lambda: 1)
    with pytest.raises(cluster.ClusterError, match="--gpus 2: this machine shows 1 CUDA GPU$"):
        cluster.connect("local", num_gpus=2)
    monkeypatch.setattr(cluster, "cuda_devices", _no_gpu)
    with pytest.raises(cluster.ClusterError, match="--gpus 2 needs CUDA GPUs on this machine: no CUDA GPU"):
        cluster.connect("local", num_gpus=2)


def _no_gpu() -> int:
    from kernels.target import NoCudaDevice

    raise NoCudaDevice("no CUDA GPU: simulated")


def test_cli_gpus_without_a_gpu_is_one_error_line(tmp_path):
    proc = cli("bench", "--op", "matmul", "--shape", "8x8x8", "--gpus", "2", "--cluster", "local", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: --gpus is for --target cuda (this is --target cpu)"


def _gpus() -> int:
    from kernels.target import NoCudaDevice, cuda_devices

    try:
        return cuda_devices()
    except NoCudaDevice:
        return 0


@pytest.mark.skipif(_gpus() < 1, reason="needs a CUDA GPU and CuPy")
def test_tune_on_a_local_cluster_of_gpus(tmp_path):
    """One runner per GPU asked for, each timing the reference kernel; a pipelined search."""
    k = min(_gpus(), 2)
    proc = cli("tune", "--op", "matmul", "--shape", "256x256x256", "--target", "cuda", "--agent", "random",
               "--budget", "8", "--rounds", "1", "--cluster", "local", "--gpus", str(k), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["measurements"] == 8 and out["pipelined"] and out["cluster"]["devices"] == k
    assert len({r["runner"] for r in out["cluster"]["runners"]}) == k
