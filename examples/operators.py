"""Operators of your own, with no library code changed: point $SCHEDGYM_OPERATORS at this
file (several files: separated like PATH) and every command knows them, e.g.

    SCHEDGYM_OPERATORS=examples/operators.py python -m experiments tune --op matmul_nt --shape 512x512x512
    SCHEDGYM_OPERATORS=examples/operators.py python -m experiments tune --op conv2d_nhwc --shape 1,56,56,64,64,3,3,1,1

An operator is one multiply-accumulate over a loop domain, declared as data: its axes
(spatial, or reduce), its tensors, the affine index of the output and of the two operands,
and a numpy reference the kernels are checked against. No expert schedule, policy or
shape family is needed to tune it (README, "Adding an operator").
"""

import numpy as np

from kernels.ir.ops import Access, Affine, Axis, Tensor, register


def matmul_nt(m, n, k):
    """C[i, j] = sum_k A[i, k] * B[j, k]: B stored N x K, as attention's Q @ K^T reads K."""
    return dict(axes=(Axis("i", m), Axis("j", n), Axis("k", k, reduce=True)),
                tensors=(Tensor("A", (m, k), "input"), Tensor("B", (n, k), "input"), Tensor("C", (m, n), "output")),
                out=Access("C", (Affine.of("i"), Affine.of("j"))),
                lhs=Access("A", (Affine.of("i"), Affine.of("k"))),
                rhs=Access("B", (Affine.of("j"), Affine.of("k"))),
                reference_fn=lambda A, B: A.astype(np.float64) @ B.T.astype(np.float64))


def conv1d(n, c, w, k, s):
    """O[n, k, x] = sum_{c, r} I[n, c, x + r] * W[k, c, r]: a 1-D convolution, no padding."""
    ow = w - s + 1
    if ow < 1:
        raise ValueError(f"a {s}-wide window does not fit in {w}")

    def reference(I, W):
        windows = np.lib.stride_tricks.sliding_window_view(I.astype(np.float64), s, axis=2)   # n c x r
        return np.einsum("ncxr,kcr->nkx", windows, W.astype(np.float64))

    return dict(axes=(Axis("n", n), Axis("k", k), Axis("x", ow), Axis("c", c, True), Axis("r", s, True)),
                tensors=(Tensor("I", (n, c, w), "input"), Tensor("W", (k, c, s), "input"),
                         Tensor("O", (n, k, ow), "output")),
                out=Access("O", (Affine.of("n"), Affine.of("k"), Affine.of("x"))),
                lhs=Access("I", (Affine.of("n"), Affine.of("c"), Affine.of("x", "r"))),
                rhs=Access("W", (Affine.of("k"), Affine.of("c"), Affine.of("r"))),
                reference_fn=reference)


def conv2d_nhwc(n, h, w, c, k, r, s, stride, pad):
    """O[n, y, x, k] = sum I[n, y*stride + ry - pad, x*stride + rx - pad, c] * W[ry, rx, c, k]:
    the channels-last layout (NHWC input, HWIO weights) of TensorFlow and of torch's
    channels_last, which the shipped conv2d (NCHW) expert and policy do not know."""
    oh, ow = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"a {r}x{s} window with padding {pad} does not fit in {h}x{w}")

    def reference(I, W):
        x = np.pad(I.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        windows = np.lib.stride_tricks.sliding_window_view(x, (r, s), axis=(1, 2))[:, ::stride, ::stride]
        return np.einsum("nyxcrs,rsck->nyxk", windows, W.astype(np.float64))

    return dict(axes=(Axis("n", n), Axis("y", oh), Axis("x", ow), Axis("k", k),
                      Axis("ry", r, True), Axis("rx", s, True), Axis("c", c, True)),
                tensors=(Tensor("I", (n, h, w, c), "input"), Tensor("W", (r, s, c, k), "input"),
                         Tensor("O", (n, oh, ow, k), "output")),
                out=Access("O", (Affine.of("n"), Affine.of("y"), Affine.of("x"), Affine.of("k"))),
                lhs=Access("I", (Affine.of("n"), Affine.of(("y", stride), "ry", const=-pad),
                                 Affine.of(("x", stride), "rx", const=-pad), Affine.of("c"))),
                rhs=Access("W", (Affine.of("ry"), Affine.of("rx"), Affine.of("c"), Affine.of("k"))),
                reference_fn=reference)


register("matmul_nt", matmul_nt, ("M", "N", "K"))
register("conv1d", conv1d, ("N", "C", "W", "K", "S"))
register("conv2d_nhwc", conv2d_nhwc, ("N", "H", "W", "C", "K", "R", "S", "stride", "pad"))
