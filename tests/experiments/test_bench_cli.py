"""``python -m experiments bench``: run as a user would, in a subprocess."""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.cli import main
from kernels.ir.ops import make_op

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {"op", "shape", "target", "time_ms", "gflops", "library_gflops", "fraction_of_library",
                "speedup_vs_naive", "correct"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment for the CLI: its compiled kernels go to a private cache."""
    e = dict(os.environ)
    e["SCHEDGYM_CACHE"] = str(tmp_path_factory.mktemp("schedgym-cache"))
    return e


def bench(env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments", "bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stdout
    return json.loads(lines[-1])


def assert_good_summary(s: dict, op: str, shape: str, library: str) -> None:
    assert SUMMARY_KEYS <= set(s), set(s)
    assert (s["op"], s["shape"], s["target"]) == (op, shape, "cpu")
    assert s["correct"] is True
    assert s["library"] == library
    for key in ("time_ms", "gflops", "library_gflops", "fraction_of_library", "speedup_vs_naive"):
        assert isinstance(s[key], (int, float)) and math.isfinite(s[key]) and s[key] > 0, (key, s[key])


# ---------------------------------------------------------------- the happy paths

@pytest.fixture(scope="module")
def exported(env, tmp_path_factory):
    """One bench run of matmul 64x64x64 with --json and --export."""
    out = tmp_path_factory.mktemp("export") / "kernel"
    proc = bench(env, "--op", "matmul", "--shape", "64x64x64", "--rounds", "1", "--json",
                 "--export", str(out))
    return proc, out


def test_matmul_json_summary(exported):
    proc, _ = exported
    s = summary(proc)
    assert_good_summary(s, "matmul", "64x64x64", "numpy")
    assert s["schedule"] == "expert"
    assert "Traceback" not in proc.stderr
    # the table for people comes before the JSON line
    assert "matmul 64x64x64" in proc.stdout.splitlines()[0]


def test_export_writes_kernel_files(exported):
    proc, out = exported
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["kernel.c", "kernel.json", "kernel.so"]
    meta = json.loads((out / "kernel.json").read_text())
    assert meta["op"] == "matmul" and meta["shape"] == "64x64x64"
    assert meta["steps"], "the expert schedule's steps"
    assert [a["name"] for a in meta["args"]] == ["A", "B", "C"]
    assert f"void {meta['function']}(" in (out / "kernel.c").read_text()


def _call_exported(out: Path, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    meta = json.loads((out / "kernel.json").read_text())
    lib = ctypes.CDLL(str(out / "kernel.so"))
    fn = getattr(lib, meta["function"])
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * len(meta["args"])
    arrays = {}
    for a in meta["args"]:
        assert a["dtype"] == "float32"
        if a["role"] == "output":
            arrays[a["name"]] = np.full(a["shape"], np.nan, np.float32)
        else:
            arrays[a["name"]] = rng.uniform(-1, 1, a["shape"]).astype(np.float32)
    fn(*[arrays[a["name"]].ctypes.data for a in meta["args"]])
    return arrays, meta


def test_exported_kernel_reproduces_numpy(exported):
    proc, out = exported
    assert proc.returncode == 0, proc.stderr
    arrays, _ = _call_exported(out, np.random.default_rng(1))
    expected = arrays["A"].astype(np.float64) @ arrays["B"].astype(np.float64)
    np.testing.assert_allclose(arrays["C"], expected, rtol=1e-4, atol=1e-4)


def test_schedule_from_exported_json_is_remeasured(exported, env, tmp_path):
    proc, out = exported
    assert proc.returncode == 0, proc.stderr
    again = tmp_path / "again"
    proc2 = bench(env, "--op", "matmul", "--shape", "64x64x64", "--rounds", "1", "--json",
                  "--schedule", str(out / "kernel.json"), "--export", str(again))
    s = summary(proc2)
    assert_good_summary(s, "matmul", "64x64x64", "numpy")
    assert s["schedule"] == str(out / "kernel.json")
    # the same schedule: the same steps and the same generated code
    first, second = (json.loads((d / "kernel.json").read_text()) for d in (out, again))
    assert second["steps"] == first["steps"]
    assert (again / "kernel.c").read_text() == (out / "kernel.c").read_text()


def test_naive_schedule(env):
    s = summary(bench(env, "--op", "matmul", "--shape", "16x8x4", "--schedule", "naive",
                      "--rounds", "1", "--json"))
    assert s["correct"] is True and s["schedule"] == "naive"
    assert s["speedup_vs_naive"] == pytest.approx(1.0)


def test_conv2d_against_torch(env, tmp_path):
    out = tmp_path / "conv"
    proc = bench(env, "--op", "conv2d", "--shape", "1,4,9,9,8,3,3,2,1", "--rounds", "1", "--json",
                 "--export", str(out))
    s = summary(proc)
    assert_good_summary(s, "conv2d", "1,4,9,9,8,3,3,2,1", "torch")
    arrays, meta = _call_exported(out, np.random.default_rng(2))
    assert [a["name"] for a in meta["args"]] == ["I", "W", "O"]
    ref = make_op("conv2d", "1,4,9,9,8,3,3,2,1").reference({"I": arrays["I"], "W": arrays["W"]})
    np.testing.assert_allclose(arrays["O"], ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- bad input

BAD = [
    ("unknown-op", ["--op", "nosuchop", "--shape", "3x3x3"]),
    ("malformed-shape", ["--op", "matmul", "--shape", "3xax4"]),
    ("zero-extent", ["--op", "matmul", "--shape", "0x3x4"]),
    ("negative-extent", ["--op", "matmul", "--shape=-3x3x4"]),
    ("too-few-numbers", ["--op", "matmul", "--shape", "3x3"]),
    ("too-many-numbers", ["--op", "matmul", "--shape", "3x3x3x3"]),
    ("empty-shape", ["--op", "matmul", "--shape", ""]),
    ("conv-window-too-large", ["--op", "conv2d", "--shape", "1,1,3,3,1,5,5"]),
    ("conv-negative-pad", ["--op", "conv2d", "--shape=1,1,3,3,1,3,3,1,-1"]),
    ("missing-schedule-file", ["--op", "matmul", "--shape", "4x4x4", "--schedule", "no/such/file.json"]),
    ("missing-shape", ["--op", "matmul"]),
    ("zero-rounds", ["--op", "matmul", "--shape", "4x4x4", "--rounds", "0"]),
    ("rounds-not-a-number", ["--op", "matmul", "--shape", "4x4x4", "--rounds", "two"]),
    ("unknown-flag", ["--op", "matmul", "--shape", "4x4x4", "--frobnicate"]),
]


@pytest.mark.parametrize("args", [b[1] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_error_line(env, args):
    proc = bench(env, *args, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0]


def _schedule_file(tmp_path: Path, content: str) -> str:
    p = tmp_path / "schedule.json"
    p.write_text(content)
    return str(p)


BAD_FILES = [
    ("not-json", "this is not json"),
    ("other-shape", json.dumps({"op": "matmul", "shape": "8x8x8", "steps": []})),
    ("illegal-step", json.dumps({"op": "matmul", "shape": "4x4x4",
                                 "steps": [{"step": "Split", "loop": "i", "factor": 0}]})),
    ("unknown-step", json.dumps({"op": "matmul", "shape": "4x4x4", "steps": [{"step": "Bogus"}]})),
]


MALFORMED_FILES = [
    ("top-level-list", "[1, 2]"),
    ("step-not-an-object", json.dumps({"op": "matmul", "shape": "4x4x4", "steps": [1]})),
    ("reorder-order-not-a-list", json.dumps({"op": "matmul", "shape": "4x4x4",
                                             "steps": [{"step": "Reorder", "order": 5}]})),
]


@pytest.mark.parametrize("content", [b[1] for b in BAD_FILES + MALFORMED_FILES],
                         ids=[b[0] for b in BAD_FILES + MALFORMED_FILES])
def test_bad_schedule_file_is_one_error_line(env, tmp_path, content):
    proc = bench(env, "--op", "matmul", "--shape", "4x4x4", "--schedule", _schedule_file(tmp_path, content),
                 timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_main_returns_exit_code_without_subprocess(capsys):
    assert main(["bench", "--op", "matmul", "--shape", "0x3x4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_export_into_a_file_fails_cleanly(env, tmp_path):
    target = tmp_path / "not-a-directory"
    target.write_text("")
    proc = bench(env, "--op", "matmul", "--shape", "8x8x8", "--rounds", "1", "--export", str(target))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr


def test_export_of_a_cuda_kernel_writes_its_source_and_launch(tmp_path):
    from experiments.bench import export_kernel
    from kernels.experts import expert_schedule
    from kernels.codegen import render
    from kernels.target import cuda_target_for_compile

    target = cuda_target_for_compile("sm_90")
    schedule = expert_schedule(make_op("matmul", "64x64x64"), target)
    kernel = render(schedule, target)
    export_kernel(str(tmp_path), kernel, "", schedule, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernel.cu", "kernel.json"]
    meta = json.loads((tmp_path / "kernel.json").read_text())
    assert meta["function"] == kernel.name and set(meta["launch"]) == {"grid", "block", "shared_bytes"}
    assert "-arch=sm_90" in meta["compile"]
    assert (tmp_path / "kernel.cu").read_text() == kernel.source


@pytest.mark.parametrize("command", [["bench", "--shape", "8x8x8"], ["tune", "--shape", "8x8x8", "--budget", "2"],
                                     ["train", "--timesteps", "8"]])
def test_cuda_without_a_gpu_is_one_clear_error(capsys, tmp_path, command):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed: there may be a GPU here")
    except ImportError:
        pass
    args = [command[0], "--op", "matmul", *command[1:], "--target", "cuda"]
    if command[0] != "bench":
        args += ["--runs", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no CUDA GPU"), err
    assert not any(tmp_path.iterdir())   # nothing half-written


@pytest.mark.parametrize("suite", ["kernels-cuda", "cluster-cuda", "heldout-cuda"])
def test_a_cuda_suite_without_a_gpu_is_one_clear_error(capsys, tmp_path, monkeypatch, suite):
    from kernels import target as targets

    def no_gpu(device_id: int = 0):
        raise targets.NoCudaDevice("no CUDA GPU: none here")

    monkeypatch.setattr(targets, "cuda_target", no_gpu)   # also where CuPy and a GPU are present
    out = tmp_path / "BENCHMARKS.md"
    assert main(["benchmark", "--suite", suite, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no CUDA GPU"), err
    assert not out.exists()


def test_a_suite_keeps_what_its_section_held_before(tmp_path):
    """A rerun puts its rows on top and keeps the earlier run's below them; the other
    sections, and the text around them, stay as they were."""
    from experiments.benchmark import write_section

    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nintro\n")
    write_section(out, "timing-cpu", "Timing", ["first run: 1.00"])
    write_section(out, "heldout-cpu", "Held out", ["other: 2.00"])
    write_section(out, "timing-cpu", "Timing", ["second run: 1.10"])
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert text.count("<!-- suite:timing-cpu -->") == 1 and text.count("## Timing") == 1
    section = text.split("<!-- suite:timing-cpu -->")[1].split("<!-- /suite:timing-cpu -->")[0]
    assert section.index("second run: 1.10") < section.index("### The run before") < section.index("first run: 1.00")
    assert "other: 2.00" in text.split("<!-- /suite:timing-cpu -->")[1]


def test_a_failed_cuda_row_has_as_many_cells_as_a_timed_one():
    """A kernel that failed keeps the table's columns: its error where the time goes."""
    from experiments.benchmark import _cuda_cells

    op = make_op("matmul", "64x64x64")
    common = {"launch": ((4, 4, 1), (16, 16, 1)), "nvrtc_s": 0.5, "run_s": 1.0}
    timed = _cuda_cells(op, {"ok": True, "ms": 0.01, "lib_ms": 0.02, "ratio": 2.0, **common}, 1e6)
    failed = _cuda_cells(op, {"ok": False, "error": "out of bounds", **common}, 1e6)
    assert timed.split(" | ")[1:3] == ["0.010", "52"] and "| 2.00 | 0.50 | 1.0 |" in timed
    assert "FAILED: out of bounds" in failed and failed.count("|") == timed.count("|")


def test_a_cluster_cuda_configuration_that_fails_costs_only_itself(tmp_path):
    """Each configuration is a command of its own: an error or a hang comes back as its reason."""
    from experiments.benchmark import _command, _gpu_counts

    assert _gpu_counts(1) == [1] and _gpu_counts(2) == [1, 2] and _gpu_counts(8) == [1, 2, 8]
    bad = _command(["tune", "--op", "matmul", "--shape", "8x8x8", "--budget", "0"], tmp_path / "bad", 120)
    assert bad["error"] == "error: --budget must be at least 1", bad
    slow = _command(["tune", "--op", "matmul", "--shape", "8x8x8", "--agent", "random", "--budget", "1"],
                    tmp_path / "slow", 1)
    assert slow["error"].startswith("timed out after 1 s")


def test_the_suite_command_names_every_option_given():
    """A section's suite command reproduces its run: every option off its default, as typed."""
    from experiments.benchmark import Config, _options

    assert _options(Config(suite="heldout-cuda")) == ""
    assert _options(Config(suite="cluster-cuda", cluster_rounds=1, budget=32, out="X.md", json=True)) == \
        " --budget 32 --cluster-rounds 1"
    assert _options(Config(suite="ppo-cuda", policy=["a.pt", "b.pt"])) == " --dtype fp32 --policy a.pt b.pt"


def test_a_command_out_of_time_says_how_far_its_search_came(tmp_path):
    """The last whole line of its run's progress log (a kill can cut one) gives the measurements
    and their rate."""
    from experiments.benchmark import _progress

    assert _progress(tmp_path / "runs") == ""
    run = tmp_path / "runs" / "matmul-cuda-random-0-20261206"
    run.mkdir(parents=True)
    (run / "progress.jsonl").write_text('{"measurements": 5, "search/wall_time_s": 20.0}\n'
                                        '{"measurements": 12, "search/wall_time_s": 48.0}\n{"measure')
    assert _progress(tmp_path / "runs") == " (12 measurements in 48 s of search, 15.0/min)"


def test_the_cluster_cuda_section_keeps_every_configuration(tmp_path, monkeypatch):
    """Rows for 1, 2 and all GPUs and for train, a failed round said in its row, every result in the raw log."""
    import json as _json

    from experiments import benchmark
    from kernels import target as targets

    def fake(args, root, timeout_s):
        k = int(args[args.index("--gpus") + 1])
        if args[0] == "train":
            return {"steps_per_s": 10.0 * k}
        if k == 2 and "1" in root.name.rsplit("-", 1)[1]:
            return {"error": "timed out after 1800 s"}
        runners = [{"runner": f"10.0.0.1 GPU {i}", "median_ms": 0.5, "slow": i == 3} for i in range(k)]
        return {"measurements": 64, "wall_s": 64 / (k * 0.9), "cluster": {"runners": runners}}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(targets, "cuda_devices", lambda: 4)
    monkeypatch.setattr(benchmark, "_command", fake)
    cfg = benchmark.Config(suite="cluster-cuda", cluster_rounds=2)
    lines, results = benchmark._cluster_cuda(cfg, targets.cuda_target_for_compile())
    text = "\n".join(lines)
    assert "| 1 | 54.0 | 54.0, 54.0 | 1.00 |" in text and "| 4 | 216.0 |" in text
    assert "| 2 | 108.0 | 108.0, failed: timed out after 1800 s | 1.00 |" in text
    assert "10.0.0.1 GPU 3: 0.5000 (slow)" in text and "| 4 | 40.00 | 40.00, 40.00 |" in text
    assert "1 of 10 commands failed" in text
    [raw] = (tmp_path / "runs").glob("benchmark-cluster-cuda-*.jsonl")
    assert len([_json.loads(line) for line in raw.read_text().splitlines()]) == 10


def test_a_model_that_fails_costs_only_its_row(monkeypatch):
    """models-* suites: a model whose tune-model raises gets a failed row with its command;
    the others keep theirs."""
    from experiments import benchmark, tune_model
    from kernels.target import get_target

    def run(mc):
        if mc.model == "broken":
            raise RuntimeError("no kernel for this layer")
        return {"tasks": 3, "layers_tuned": 2, "measurements": 0 if Path(mc.database).exists() else 8,
                "tune_wall_s": 1.0, "model_ms": 1.0, "model_spread_ms": 0.1, "torch_ms": 2.0,
                "torch_spread_ms": 0.1, "speedup_vs_torch": 2.0, "folded_ms": 1.5, "speedup_vs_folded": 1.5,
                "budget": 8, "model": mc.model, "batch": mc.batch, "dtype": mc.dtype}

    monkeypatch.setattr(tune_model, "run", run)
    monkeypatch.setitem(benchmark.MODEL_CASES, "cpu", (("broken", 1, "fp32"), ("resnet18", 1, "fp32")))
    lines, results = benchmark._models(benchmark.Config(suite="models-cpu"), get_target("cpu"))
    rows = [line for line in lines if line.startswith("| broken") or line.startswith("| resnet18")]
    assert "failed: RuntimeError: no kernel for this layer" in rows[0]
    assert "`python -m experiments tune-model --model broken`" in rows[0]
    header = next(line for line in lines if line.startswith("| model"))
    assert rows[0].count("|") == header.count("|")   # the failed row keeps the table's columns
    assert rows[1].startswith("| resnet18 | 1 | fp32 | 3 | 2 | 8 |")
    assert [r.get("error") for r in results] == ["RuntimeError: no kernel for this layer", None]


@pytest.mark.parametrize("args,message", [
    ([], "error: --suite ppo-cpu needs --policy PATH..."),
    (["--policy", "nowhere/policy.pt"], "error: nowhere/policy.json not found"),
    (["--policy", "experiments/pretrained/cpu/matmul-ppo.pt", "--against", "experiments/pretrained/cpu/conv2d-ppo.pt"],
     "error: --against experiments/pretrained/cpu/conv2d-ppo.pt is a conv2d policy"),
    (["--policy", "experiments/pretrained/cuda/matmul-ppo.pt"],
     "error: experiments/pretrained/cuda/matmul-ppo.pt is a policy for cuda: --suite ppo-cpu compares cpu"),
])
def test_ppo_cpu_without_a_policy_is_one_clear_error(capsys, tmp_path, args, message):
    out = tmp_path / "BENCHMARKS.md"
    assert main(["benchmark", "--suite", "ppo-cpu", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not out.exists()


def test_ppo_cuda_times_nothing_where_the_policies_build_the_same_kernels(tmp_path, monkeypatch):
    """The shipped GPU policy against itself: every greedy kernel alike, none timed, and
    the section (one per dtype) counts where each builds the expert's."""
    from experiments import benchmark
    from kernels import target as targets
    from kernels.measure import comparison

    def no_timing(*args, **kwargs):
        raise AssertionError("kernels alike were timed")

    monkeypatch.setattr(comparison, "speedups_over", no_timing)
    monkeypatch.setattr(benchmark, "get_target", lambda kind: targets.cuda_target_for_compile())
    out, shipped = tmp_path / "BENCHMARKS.md", "experiments/pretrained/cuda/matmul-ppo.pt"
    result = benchmark.run(benchmark.Config(suite="ppo-cuda", out=str(out), policy=[shipped]))
    section = out.read_text().split("<!-- suite:ppo-cuda-fp32 -->")[1]
    assert f"`python -m experiments benchmark --suite ppo-cuda --dtype fp32 --policy {shipped}`" in section
    assert "The greedy kernels differ on 0 of 44 shapes." in section
    rows = result["results"]
    assert len(rows) == 44 and sum(r["split"] == "held_out" for r in rows) == 4
    assert all(r["trained_is_expert"] == r["base_is_expert"] for r in rows)


def test_ppo_cpu_greedy_kernels_of_one_policy_are_never_timed(monkeypatch):
    """On the CPU the greedy comparison covers the held-out split and CPU_DRAWN; a policy
    against itself builds the same kernels and times none."""
    from experiments import benchmark
    from kernels import target as targets
    from kernels.measure import comparison

    def no_timing(*args, **kwargs):
        raise AssertionError("kernels alike were timed")

    monkeypatch.setattr(comparison, "speedups_over", no_timing)
    shipped = "experiments/pretrained/cpu/dense_bias_relu-ppo.pt"
    lines, rows = benchmark._greedy_against(shipped, shipped, {"op": "dense_bias_relu"},
                                            benchmark.Config(suite="ppo-cpu", policy=[shipped]), targets.cpu_target())
    assert len(rows) == 43 and sum(r["split"] == "held_out" for r in rows) == 3
    assert "`shapes.CPU_DRAWN`" in lines[0]
    assert lines[-1].startswith("The greedy kernels differ on 0 of 43 shapes.")


def test_ppo_cpu_tunes_each_held_out_shape_with_both_policies(monkeypatch):
    from experiments import benchmark, tune
    from experiments.shapes import family

    tuned = []

    def fake_run(cfg):
        tuned.append((cfg.shape, cfg.policy, cfg.budget))
        return {"fraction_of_expert": 1.1 if cfg.policy == "mine.pt" else 1.0}

    monkeypatch.setattr(tune, "run", fake_run)
    lines, rows = benchmark._budget8_against("mine.pt", "base.pt", {"op": "matmul"})
    held_out = family("matmul", "held_out", "many")
    assert tuned == [(s, p, 8) for s in held_out for p in ("base.pt", "mine.pt")]
    assert f"| {held_out[0]} | 1.00 | 1.10 |" in lines
    assert rows[0] == {"op": "matmul", "shape": held_out[0], "base_budget8_of_expert": 1.0,
                       "trained_budget8_of_expert": 1.1}


def test_ppo_cuda_times_differing_kernels_and_flags_a_held_out_loss_beyond_noise(monkeypatch):
    from experiments import benchmark
    from experiments.shapes import family
    from kernels import target as targets
    from kernels.measure import comparison

    held_out = family("matmul", "held_out", "gpu-more")
    timed = []

    def speedups_over(op, schedules, reference, target, measurer, rounds):
        timed.append(op.shape_str)
        slower = {held_out[0]: 0.9, held_out[1]: 0.98}.get(op.shape_str, 1.1)   # trained / shipped
        return [1.0, slower]

    monkeypatch.setattr(comparison, "speedups_over", speedups_over)
    monkeypatch.setattr(benchmark, "_same_kernel_key", lambda schedule, target: object())   # every kernel differs
    lines, rows = benchmark._greedy_against(
        "experiments/pretrained/cuda/matmul-ppo.pt", "experiments/pretrained/cuda/matmul-ppo.pt", {"op": "matmul"},
        benchmark.Config(suite="ppo-cuda", policy=["p"]), targets.cuda_target_for_compile())
    assert len(timed) == len(rows) == 44
    assert f"| {held_out[0]} | held_out | no | no | 1.00 | 0.90 | 0.90 |" in lines
    # 0.98 is within the rounds' noise; 0.90 is not
    assert lines[-1].endswith(f"Trained slower by more than 3% on held-out {held_out[0]}.")


def test_ppo_cuda_refuses_a_policy_of_another_dtype(capsys, tmp_path, monkeypatch):
    import shutil

    from experiments import benchmark
    from kernels import target as targets

    monkeypatch.setattr(benchmark, "get_target", lambda kind: targets.cuda_target_for_compile())
    shipped = Path("experiments/pretrained/cuda/matmul-bf16-ppo.pt")
    shutil.copy(shipped, tmp_path / "p.pt")
    spec = json.loads(shipped.with_suffix(".json").read_text()) | {"dtype": "bf16"}
    (tmp_path / "p.json").write_text(json.dumps(spec))
    out = tmp_path / "BENCHMARKS.md"
    assert main(["benchmark", "--suite", "ppo-cuda", "--out", str(out), "--policy", str(tmp_path / "p.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'p.pt'} was trained for bf16: compare it with --dtype bf16"]
    assert not out.exists()


def test_tiles_cuda_times_each_distinct_tile_kernel_once_against_the_expert(monkeypatch):
    from experiments import benchmark
    from kernels import target as targets
    from kernels.measure import comparison

    calls = []

    def speedups_over(op, schedules, reference, target, measurer, rounds):
        calls.append((op.shape_str, len(schedules)))
        return [1.0 + 0.1 * i for i in range(len(schedules))]   # the later a tile, the faster

    monkeypatch.setattr(comparison, "speedups_over", speedups_over)
    monkeypatch.setattr(benchmark, "_tile_shapes", lambda: [("large", "4096x4096x4096"), ("drawn", "64x64x64")])
    lines, rows = benchmark._tiles_cuda(benchmark.Config(suite="tiles-cuda"), targets.cuda_target_for_compile())
    n = len(benchmark.TILE_CANDIDATES)
    assert calls[0] == ("4096x4096x4096", n)   # every tile a kernel of its own at 4096
    assert calls[1][1] < n                       # at 64x64x64 the tiles clamp to fewer kernels
    big = rows[0]
    assert big["expert_tile"] == "128x64/256" and big["best_tile"] == "256x128/256"
    assert big["expert_of_best"] == pytest.approx(1 / (1.0 + 0.1 * (n - 1)))
    assert lines[-1].startswith("The expert's tile against the best, geometric mean by split: large ")


def test_conv_tiles_cuda_times_every_candidate_tile_against_the_expert_layer_by_layer(monkeypatch):
    from experiments import benchmark
    from kernels import target as targets
    from kernels.measure import comparison

    calls = []

    def speedups_over(op, schedules, reference, target, measurer, rounds):
        calls.append((op.kind, op.shape_str, len(schedules)))
        return [1.0 + 0.1 * i for i in range(len(schedules))]

    monkeypatch.setattr(comparison, "speedups_over", speedups_over)
    monkeypatch.setattr(benchmark, "CONV_TILE_LAYERS", {"fresh": ("1,64,56,56,64,3,3,1,1",)})
    lines, rows = benchmark._tiles_cuda(benchmark.Config(suite="conv-tiles-cuda"),
                                        targets.cuda_target_for_compile(), "conv2d")
    n = len(benchmark.CONV_TILE_CANDIDATES)
    assert calls == [("conv2d", "1,64,56,56,64,3,3,1,1", n)]
    assert rows[0]["expert_tile"] == "2x7/8x2x8/c4" and rows[0]["best_tile"] == "2x2/16x2x16/c8"
    assert rows[0]["expert_of_best"] == pytest.approx(1 / (1.0 + 0.1 * (n - 1)))
    assert lines[-1] == "The expert's tile against the best, geometric mean by split: fresh 0.50 (lowest 0.50, 1 layers)."


def _cuda_tune_result(kind: str, shape: str, dtype: str) -> dict:
    """What a GPU tune returns, for suites tested without a GPU."""
    return {"op": kind, "shape": shape, "dtype": dtype, "time_ms": 0.5, "time_spread_ms": 0.01,
            "library_time_ms": 0.6, "fraction_of_library": 1.2, "expert_gflops": 4000.0,
            "fraction_of_expert": 1.1, "measurements_to_90pct": 3, "wall_s": 42.0, "measurements": 64}


def test_heldout_cuda_writes_a_section_per_dtype_and_a_failed_tune_costs_its_row(tmp_path, monkeypatch):
    from experiments import benchmark
    from kernels import target as targets

    def tune(kind, shape, agent, budget, runs, target, dtype):
        assert (agent, budget, target) == ("evolve", 64, "cuda")
        if kind == "conv2d" and shape.startswith("16,256"):
            raise RuntimeError("ran out of memory")
        return _cuda_tune_result(kind, shape, dtype)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark, "_tune", tune)
    monkeypatch.setattr(benchmark, "get_target", lambda kind: targets.cuda_target_for_compile())
    out = tmp_path / "BENCHMARKS.md"
    result = benchmark.run(benchmark.Config(suite="heldout-cuda", dtype="bf16", out=str(out)))
    text = out.read_text()
    section = text.split("<!-- suite:heldout-cuda-bf16 -->")[1].split("<!-- /suite:heldout-cuda-bf16 -->")[0]
    assert "Suite command: `python -m experiments benchmark --suite heldout-cuda --dtype bf16`" in section
    assert ("| matmul | 1024x1024x1024 | 0.5000 ± 0.0100 | 0.6000 | **1.20** | 4.0 | 1.10 | 3 | 42 | "
            "`python -m experiments tune --op matmul --shape 1024x1024x1024 --target cuda --dtype bf16 --budget 64` |"
            ) in section
    assert "| conv2d | 16,256,14,14,1024,1,1,1,0 | failed: RuntimeError: ran out of memory |" in section
    assert "kept under `runs/benchmark-heldout-cuda-bf16-" in section
    assert len(result["results"]) == len(benchmark.HELDOUT_CUDA_CASES["bf16"])
    benchmark.run(benchmark.Config(suite="heldout-cuda", out=str(out)))
    assert "<!-- suite:heldout-cuda -->" in out.read_text() and "--target cuda --budget 64`" in out.read_text()


def test_the_held_out_suites_tune_shapes_no_family_trains_on():
    from experiments import benchmark, shapes

    trained = {(op, s) for op, fams in shapes.FAMILIES.items() for f in fams.values() for s in f["train"]}
    cases = {*benchmark.HELDOUT_CASES, *(c for cs in benchmark.HELDOUT_CUDA_CASES.values() for c in cs)}
    assert not cases & trained


def test_heldout_cuda_past_its_time_limit_writes_the_rows_measured(tmp_path, monkeypatch):
    from experiments import benchmark
    from kernels import target as targets

    clock = iter(range(0, 1000, 60))   # a minute a reading: started at 0, the checks at 60 and 120 go on, 180 stops
    monkeypatch.setattr(benchmark.time, "monotonic", lambda: next(clock))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark, "_tune",
                        lambda kind, shape, agent, budget, runs, target, dtype: _cuda_tune_result(kind, shape, dtype))
    monkeypatch.setattr(benchmark, "get_target", lambda kind: targets.cuda_target_for_compile())
    out = tmp_path / "BENCHMARKS.md"
    result = benchmark.run(benchmark.Config(suite="heldout-cuda", out=str(out), time_limit=150))
    cases = benchmark.HELDOUT_CUDA_CASES["fp32"]
    assert [r["shape"] for r in result["results"]] == [shape for _, shape in cases[:2]]
    assert f"Stopped at `--time-limit 150`: 2 of {len(cases)} shapes measured." in out.read_text()


def test_heldout_cpu_repeats_each_shape_and_counts_the_runs_above_the_expert(tmp_path, monkeypatch):
    from experiments import benchmark
    from kernels.measure import peak

    def tune(kind, shape, agent, budget, runs, seed=0):
        assert (agent, budget) == ("evolve", 64) and runs.startswith("runs/benchmark-heldout-cpu-")
        of_expert = {0: 1.10, 1: 1.01, 2: 1.05}[seed] if kind == "matmul" else 1.0
        return {"gflops": 100.0 + seed, "fraction_of_library": 1.2, "fraction_of_expert": of_expert,
                "measurements_to_90pct": None if (kind, seed) == ("conv2d", 2) else 3 + seed, "wall_s": 10.0,
                "measurements": 64, "run_dir": f"{runs}/{kind}-{seed}"}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark, "_tune", tune)
    monkeypatch.setattr(peak, "fma_peak_gflops", lambda target: 200.0)
    cases = [("matmul", "64x64x64"), ("conv2d", "1,8,8,8,8,3,3,1,1")]
    lines, results = benchmark._heldout_cpu(benchmark.Config(suite="heldout-cpu"), cases)
    text = "\n".join(lines)
    assert ("| matmul | 64x64x64 | 101.0 | 0.51 | 1.20 [1.20-1.20] | 1.05 [1.01-1.10] | 2 of 3 | 5 | 10 | "
            "`python -m experiments tune --op matmul --shape 64x64x64 --budget 64 --seed S` |") in text
    assert "| 1.00 [1.00-1.00] | 0 of 3 | - |" in text   # a run that never reached 90% shows
    assert "more than 3% in the median run: 1 of 2 shapes" in text and "never reached in some run" in text
    assert results[0] == {"peak_gflops": 200.0} and [r["seed"] for r in results[1]["runs"]] == [0, 1, 2]


def test_heldout_cpu_wide_tunes_its_own_shapes_and_names_its_repeats(tmp_path, monkeypatch):
    from experiments import benchmark
    from kernels.measure import peak

    tuned = []

    def tune(kind, shape, agent, budget, runs, seed=0):
        assert runs.startswith("runs/benchmark-heldout-wide-cpu-")
        tuned.append((kind, shape, seed))
        return {"gflops": 100.0, "fraction_of_library": 1.2, "fraction_of_expert": 1.1, "measurements_to_90pct": 1,
                "wall_s": 10.0, "measurements": 64, "run_dir": f"{runs}/{kind}"}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark, "_tune", tune)
    monkeypatch.setattr(peak, "fma_peak_gflops", lambda target: 200.0)
    out = tmp_path / "B.md"
    benchmark.run(benchmark.Config(suite="heldout-wide-cpu", repeats=1, out=str(out)))
    assert tuned == [(kind, shape, 0) for kind, shape in benchmark.HELDOUT_WIDE_CASES]
    assert not set(benchmark.HELDOUT_WIDE_CASES) & set(benchmark.HELDOUT_CASES)
    assert "Suite command: `python -m experiments benchmark --suite heldout-wide-cpu --repeats 1`" in out.read_text()
