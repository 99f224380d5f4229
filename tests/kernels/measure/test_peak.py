import pytest

from kernels.measure.peak import fma_peak_gflops
from kernels.target import cpu_target, cuda_target_for_compile


def test_the_fma_peak_is_measured_and_below_the_bound_no_kernel_passes():
    target = cpu_target()
    peak = fma_peak_gflops(target, steps=200_000, reps=2)
    assert 0 < peak < target.peak_gflops


def test_the_fma_peak_refuses_a_gpu_and_names_a_compiler_that_fails():
    with pytest.raises(ValueError, match="measures a CPU"):
        fma_peak_gflops(cuda_target_for_compile())
    with pytest.raises(RuntimeError, match="did not compile: /nonexistent/cc"):
        fma_peak_gflops(cpu_target(), steps=10, reps=1, cc="/nonexistent/cc")
