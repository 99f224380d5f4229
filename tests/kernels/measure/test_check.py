"""The output check on its own: the tolerance against simulated fp32 sums, guard zones."""

import math

import numpy as np
import pytest

from kernels.ir.dtypes import DTYPES, decode, encode
from kernels.ir.ops import make_op
from kernels.measure.check import (PRECISIONS, Guarded, Tolerance, check_call, random_canary,
                                   reduction_length, tolerance)

U = 2.0 ** -24


def test_reduction_length_per_operator():
    assert reduction_length(make_op("matmul", "8x16x32")) == 32
    assert reduction_length(make_op("dense_bias_relu", "8x16x32")) == 32
    assert reduction_length(make_op("batch_matmul", "2x8x16x32")) == 32
    assert reduction_length(make_op("conv2d", "1,3,8,8,4,3,3")) == 27
    assert reduction_length(make_op("depthwise_conv2d", "1,3,8,8,5,5")) == 25


def test_tolerance_formula():
    tol = tolerance(make_op("matmul", "64x64x1024"))
    assert tol.atol == pytest.approx(8 * 1024 * U / 3)
    assert tol.rtol == pytest.approx(4 * U * 11)
    # a longer reduction allows more, a shorter one less
    assert tolerance(make_op("matmul", "64x64x8")).atol < tol.atol < tolerance(make_op("matmul", "2x2x4096")).atol


def test_tolerance_is_keyed_by_dtype():
    assert set(PRECISIONS) == set(DTYPES) == {"fp32", "tf32", "bf16", "fp16"}
    fp32, bf16 = tolerance(make_op("matmul", "8x8x1024")), tolerance(make_op("matmul", "8x8x1024", "bf16"))
    assert bf16.rtol == pytest.approx(4 * 2 * U * 11 + 2 * 2.0 ** -8) and bf16.atol == pytest.approx(2 * fp32.atol)
    tf32 = tolerance(make_op("matmul", "8x8x1024", "tf32"))
    assert tf32.atol == pytest.approx(8 / 3 * (1024 * 2 * U + 32 * 2 * 2.0 ** -11))


def _tf32(x: np.ndarray) -> np.ndarray:
    """cvt.rna.tf32.f32: to nearest, ties away, 13 low bits cleared."""
    return ((np.asarray(x, np.float32).view(np.uint32) + 0x1000) & ~np.uint32(0x1FFF)).view(np.float32)


def _truncated(acc: np.ndarray) -> np.ndarray:
    """``acc`` (float64) to fp32 towards zero, as the tensor core's adder stores it."""
    f32 = acc.astype(np.float32)
    over = np.abs(f32.astype(np.float64)) > np.abs(acc)
    f32[over] = np.nextafter(f32[over], np.float32(0))
    return f32.astype(np.float64)


def tensor_core_sums(a: np.ndarray, b: np.ndarray, dtype: str, drop: int | None = None) -> np.ndarray:
    """Row-wise sums of a*b as a tensor-core kernel computes them: inputs as stored (tf32
    rounds them to 10 mantissa bits), each k-step of 16 (8 for tf32) products added to the
    fp32 accumulator at once and truncated towards zero, the sum rounded to the stored
    output; ``drop`` leaves out one k-step (a wrong kernel)."""
    x, y = (_tf32(decode(v, dtype)) if dtype == "tf32" else decode(v, dtype) for v in (a, b))
    x, y = x.astype(np.float64), y.astype(np.float64)
    step = DTYPES[dtype].mma_k
    acc = np.zeros(a.shape[0], np.float64)
    for s in range(0, a.shape[1], step):
        if s // step != drop:
            acc = _truncated(acc + (x[:, s:s + step] * y[:, s:s + step]).sum(axis=1))
    return encode(acc.astype(np.float32), dtype)


@pytest.mark.parametrize("dtype", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("k", [16, 256, 4096])
def test_each_dtype_tolerance_passes_tensor_core_sums_and_fails_a_wrong_kernel(dtype, k):
    op = make_op("matmul", f"64x1x{k}", dtype)
    rng = np.random.default_rng(k)
    inputs = op.random_inputs(rng)
    a, b = inputs["A"], inputs["B"][:, 0][None, :].repeat(64, axis=0)
    ref = op.reference(inputs)
    canary = random_canary(rng, dtype)
    bufs = {n: Guarded.alloc(np, op.tensor(n).shape, canary, inputs.get(n), dtype) for n in ("A", "B", "C")}
    raws = {n: g.raw for n, g in bufs.items()}
    tol = tolerance(op)
    bufs["C"].array[...] = tensor_core_sums(a, b, dtype)[:, None]
    assert check_call(bufs, raws, "C", ref, inputs, tol) is None
    bufs["C"].array[...] = tensor_core_sums(a, b, dtype, drop=k // DTYPES[dtype].mma_k // 2)[:, None]
    assert check_call(bufs, raws, "C", ref, inputs, tol).startswith("wrong result: max err")
    bufs["C"].array[...] = tensor_core_sums(a, b, dtype)[:, None]
    bufs["C"].raw[-1] ^= 1
    assert check_call(bufs, raws, "C", ref, inputs, tol) == "wrote out of bounds of C (after the end)"


def three_tf32_sums(a: np.ndarray, b: np.ndarray, slice_steps: int | None, drop: int | None = None) -> np.ndarray:
    """Row-wise sums of a*b as an fp32 kernel on tensor cores computes them (3xTF32): each
    input split into a tf32 high part and the tf32 of its remainder, per k-step of 8 three
    instructions (remainder x high, high x remainder, high x high) added to the accumulator
    with truncation; each slice of ``slice_steps`` k-steps in fresh accumulators, then added
    to the thread's with fp32 rounding (None: one accumulator for all of K)."""
    hi = [_tf32(v) for v in (a, b)]
    lo = [_tf32(v - h) for v, h in zip((a, b), hi)]
    (xh, yh), (xl, yl) = ([v.astype(np.float64) for v in pair] for pair in (hi, lo))
    steps = a.shape[1] // 8
    total, part = np.zeros(a.shape[0], np.float32), np.zeros(a.shape[0])
    for s in range(steps):
        k = slice(8 * s, 8 * s + 8)
        if s != drop:
            for x, y in ((xl, yh), (xh, yl), (xh, yh)):
                part = _truncated(part + (x[:, k] * y[:, k]).sum(axis=1))
        if slice_steps and (s + 1) % slice_steps == 0 or s == steps - 1:
            total, part = (total + part).astype(np.float32), np.zeros(a.shape[0])
    return total


def test_fp32_tolerance_passes_3xtf32_sums_by_slices_and_refuses_one_accumulator():
    """Why an fp32 kernel on tensor cores sums each k slice apart (kernels.ir.lower,
    ``_slice_loop``): the adder truncates, a bias that grows with the accumulator, so one
    accumulator over 4096 products leaves fp32's tolerance (as it did on an H100: 3.7e-3 where
    8.8e-4 is allowed); slices of 16 products stay within it, and a dropped k-step is caught."""
    k = 4096
    op = make_op("matmul", f"1x1x{k}")
    rng = np.random.default_rng(7)
    a, b = (rng.uniform(-1, 1, (2000, k)).astype(np.float32) for _ in range(2))
    ref = (a.astype(np.float64) * b).sum(axis=1)
    tol = tolerance(op)
    assert tol.violation(three_tf32_sums(a, b, 2), ref) is None
    assert tol.violation(three_tf32_sums(a, b, None), ref) is not None
    assert tol.violation(three_tf32_sums(a, b, 2, drop=k // 16), ref) is not None


def fp32_sums(a: np.ndarray, b: np.ndarray, order: str) -> np.ndarray:
    """Row-wise sums of a*b in fp32, the ways a schedule or a compiler may order them."""
    p64 = a.astype(np.float64) * b         # exact: a product of two fp32 fits in fp64
    k = a.shape[1]
    if order == "lanes":                   # 8 vector lanes, then the lanes added up
        lanes = np.zeros((a.shape[0], 8), np.float32)
        for s in range(0, k, 8):
            chunk = p64[:, s:s + 8]
            lanes[:, :chunk.shape[1]] = (lanes[:, :chunk.shape[1]] + chunk).astype(np.float32)
        return lanes.sum(axis=1, dtype=np.float32)
    acc = np.zeros(a.shape[0], np.float32)
    ks = range(k - 1, -1, -1) if order == "backward" else range(k)
    for i in ks:
        if order == "rounded products":    # no FMA: the product is rounded, then added
            acc = acc + a[:, i] * b[:, i]
        else:                              # FMA: one rounding per step
            acc = (acc + p64[:, i]).astype(np.float32)
    return acc


@pytest.mark.parametrize("k", [1, 2, 3, 5, 9, 27, 64, 300, 1024, 2304])
def test_tolerance_accepts_fp32_sums_in_any_order(k):
    op = make_op("matmul", f"1x1x{k}")
    tol = tolerance(op)
    rng = np.random.default_rng(k)
    n = max(2000, 400_000 // k)
    a = rng.uniform(-1, 1, (n, k)).astype(np.float32)
    b = rng.uniform(-1, 1, (n, k)).astype(np.float32)
    ref = (a.astype(np.float64) * b).sum(axis=1).astype(np.float32)
    for order in ("forward", "backward", "rounded products", "lanes"):
        assert tol.violation(fp32_sums(a, b, order), ref) is None, (k, order)
    if k > 1:   # one product left out is a real error, however long the reduction
        dropped = fp32_sums(a[:, 1:], b[:, 1:], "forward")
        assert tol.violation(dropped, ref).startswith("max err"), k


def test_tolerance_is_tighter_than_the_old_global_bound_for_short_reductions():
    """1e-4 * max|ref| accepted an error of 1e-5 on a length-8 reduction, ~170 times the
    unit roundoff; eight products summed cannot be that far off."""
    tol = tolerance(make_op("matmul", "8x8x8"))
    ref = np.full(4, 1.0, np.float32)
    assert tol.violation(ref + np.float32(1e-5), ref) is not None
    assert tol.violation(ref + np.float32(2 * U), ref) is None


def test_violation_reports_nan_and_where():
    tol = Tolerance(1e-6, 0.0)
    ref = np.zeros((2, 3), np.float32)
    out = ref.copy()
    out[1, 2] = 0.5
    assert tol.violation(out, ref) == ("max err 5.0e-01 at [1, 2], allowed 1.0e-06 "
                                       "(1 of 6 elements out of tolerance)")
    out[0, 0] = np.nan
    assert tol.violation(out, ref) == "NaN or inf in output (1 of 6 elements)"


def test_guarded_buffer_margins():
    rng = np.random.default_rng(0)
    canary = random_canary(rng)
    assert math.isnan(np.array(canary, np.uint32).view(np.float32)) and canary != 0x7FC00000
    small = Guarded.alloc(np, (3, 5), canary)
    big = Guarded.alloc(np, (64, 64), canary, np.ones((64, 64), np.float32))
    assert small.margin == 16 and big.margin == 1024        # 64 bytes; a page for big buffers
    assert small.array.ctypes.data % 64 == 0 and np.isnan(small.array).all()
    assert big.raw.ctypes.data % 4096 == 0      # its own pages, wherever the heap stands
    assert (big.array == 1).all() and big.overrun(big.raw) is None
    flat = big.raw[big.margin:-big.margin].view(np.float32)
    assert flat.ctypes.data == big.array.ctypes.data
    big.raw[big.margin - 1] = 0
    assert big.overrun(big.raw) == "before the start"
    small.raw[-1] = 0
    assert small.overrun(small.raw) == "after the end"


def test_check_call_order_of_reasons():
    op = make_op("matmul", "2x2x2")
    inputs = op.random_inputs(np.random.default_rng(0))
    ref = op.reference(inputs)
    canary = random_canary(np.random.default_rng(1))
    bufs = {n: Guarded.alloc(np, op.tensor(n).shape, canary, inputs.get(n)) for n in ("A", "B", "C")}
    raws = {n: g.raw for n, g in bufs.items()}
    tol = tolerance(op)

    def check(**kw):
        return check_call(bufs, raws, "C", ref, inputs, tol, **kw)

    assert check().startswith("wrong result: NaN")
    bufs["C"].array[...] = ref
    assert check() is None
    first = ref.copy()
    first.view(np.uint32)[0, 0] ^= 1
    assert check(call="timed call 3", first=first) == ("nondeterministic output: timed call 3 differs "
                                                       "from the first call in 1 element(s), first at [0, 0]")
    bufs["B"].array[1, 1] += 1
    assert check(call="timed call 3") == "wrong result on timed call 3: kernel wrote to input B"
    bufs["A"].raw[-1] = 0
    assert check(call="timed call 3") == "wrote out of bounds of A (after the end) on timed call 3"
