"""The CPU's measured fp32 FMA peak: the roof a compute-bound kernel's GFLOPS is read against.

``Target.peak_gflops`` is a bound no kernel can pass (a sanity check on timings); this is
what the machine does now: independent FMA chains on the widest vectors, on every core,
with the same compiler and flags as the kernels. A kernel near it has little left for any
schedule to find, whatever a search or an expert does.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from ..target import CC, CFLAGS, Target

CHAINS = 12   # independent accumulators: enough to cover the FMA latency on two pipes
PROBE = r"""
#include <omp.h>
#include <stdio.h>
typedef float vec __attribute__((vector_size(%(bytes)d)));
int main(void) {
    const long steps = %(steps)dL;
    double best = 0;
    for (int rep = 0; rep < %(reps)d; rep++) {
        double t0 = omp_get_wtime();
        float sink = 0;
        #pragma omp parallel reduction(+:sink)
        {
            vec acc[%(chains)d], mul, add;
            for (int l = 0; l < %(lanes)d; l++) { mul[l] = 1.0000001f; add[l] = 1e-7f; }
            for (int c = 0; c < %(chains)d; c++) for (int l = 0; l < %(lanes)d; l++) acc[c][l] = (float)c;
            for (long s = 0; s < steps; s++) {
                #pragma GCC unroll %(chains)d
                for (int c = 0; c < %(chains)d; c++) acc[c] = acc[c] * mul + add;
            }
            for (int c = 0; c < %(chains)d; c++) for (int l = 0; l < %(lanes)d; l++) sink += acc[c][l];
        }
        double seconds = omp_get_wtime() - t0;
        double gflops = 2.0 * %(lanes)d * %(chains)d * steps * omp_get_max_threads() / seconds / 1e9;
        if (gflops > best) best = gflops;
        if (sink == 42.0f) printf("#");
    }
    printf("peak %%.3f\n", best);
    return 0;
}
"""


def fma_peak_gflops(target: Target, steps: int = 20_000_000, reps: int = 5, cc: str = CC) -> float:
    """The best of ``reps`` runs of the probe on all of ``target``'s cores, in GFLOPS.
    Raises RuntimeError (naming the step) where it cannot be built or run."""
    if target.kind != "cpu":
        raise ValueError(f"fma_peak_gflops measures a CPU, not {target.kind!r}")
    source = PROBE % {"bytes": 4 * target.vector_lanes, "lanes": target.vector_lanes, "chains": CHAINS,
                      "steps": steps, "reps": reps}
    flags = [f for f in CFLAGS if f not in ("-shared", "-fPIC")]
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(source)
        try:
            built = subprocess.run([cc, *flags, str(src), "-o", str(exe)], capture_output=True, text=True)
        except OSError as e:
            raise RuntimeError(f"the FMA peak probe did not compile: {cc}: {e.strerror}") from e
        if built.returncode:
            raise RuntimeError(f"the FMA peak probe did not compile: {built.stderr.strip()[:300]}")
        try:
            ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError("the FMA peak probe ran past 120 s") from e
    match = re.search(r"peak ([0-9.]+)", ran.stdout)
    if ran.returncode or not match:
        raise RuntimeError(f"the FMA peak probe failed (exit {ran.returncode}): {ran.stderr.strip()[:300]}")
    return float(match[1])
