"""Operators declared as data.

Every operator here is one multiply-accumulate over a loop domain,

    out[out_index] += lhs[lhs_index] * rhs[rhs_index]      (summed over reduce axes)

optionally followed by an element-wise epilogue on the finished sum
(``bias_relu``: ``out = max(out + bias[...], 0)``). Index expressions are affine in
the axes, so footprints, strides and bounds can be derived instead of hand-written.
An input index that can fall outside its tensor (convolution padding) reads zero.

Shape strings: ``matmul``/``dense_bias_relu`` ``MxNxK``; ``batch_matmul``
``BxMxNxK``; ``conv2d``/``conv2d_bias_relu`` ``N,C,H,W,K,R,S[,stride[,pad]]`` (NCHW
input, OIHW weights, a bias per output channel); ``depthwise_conv2d`` ``N,C,H,W,R,S[,stride[,pad]]``. ``x`` and ``,``
are interchangeable.

Operators of your own join through :func:`register`, called by the files that
``$SCHEDGYM_OPERATORS`` lists (loaded when this module is imported, in the measuring
workers too).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .dtypes import DEFAULT, DTYPES, decode, encode

INPUT_RANGE = 1.0  # inputs are drawn uniformly from [-INPUT_RANGE, INPUT_RANGE]


class OperatorError(ValueError):
    """An unknown operator or a shape it cannot take."""


@dataclass(frozen=True)
class Axis:
    name: str
    extent: int
    reduce: bool = False


# An affine index: ((axis, coefficient), ...) plus a constant.
@dataclass(frozen=True)
class Affine:
    terms: tuple[tuple[str, int], ...]
    const: int = 0

    @staticmethod
    def of(*terms: str | tuple[str, int], const: int = 0) -> "Affine":
        return Affine(tuple((t, 1) if isinstance(t, str) else t for t in terms), const)

    def range(self, extents: dict[str, int]) -> tuple[int, int]:
        """Smallest and largest value over the axes' domains."""
        lo = hi = self.const
        for axis, coef in self.terms:
            span = coef * (extents[axis] - 1)
            lo, hi = lo + min(0, span), hi + max(0, span)
        return lo, hi


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    role: str  # "input" or "output"


@dataclass(frozen=True)
class Access:
    tensor: str
    index: tuple[Affine, ...]

    @property
    def axes(self) -> set[str]:
        """The op axes this access reads."""
        return {a for aff in self.index for a, c in aff.terms if c}


@dataclass(frozen=True)
class Operator:
    """One operator instance: a kind plus concrete extents."""

    kind: str
    shape: tuple[int, ...]
    axes: tuple[Axis, ...]
    tensors: tuple[Tensor, ...]  # the kernel's arguments, in order: inputs, then the output
    out: Access
    lhs: Access
    rhs: Access
    bias: Access | None = None  # epilogue max(out + bias, 0) when set
    dtype: str = DEFAULT        # kernels.ir.dtypes: how tensors are stored and multiplied
    reference_fn: Callable[..., np.ndarray] = field(default=None, compare=False, repr=False)

    @property
    def shape_str(self) -> str:
        return ",".join(map(str, self.shape)) if "conv" in self.kind else "x".join(map(str, self.shape))

    @property
    def params(self) -> dict[str, int]:
        """The shape by parameter name, e.g. ``{"M": 64, "N": 64, "K": 64}``."""
        return dict(zip(OPERATORS[self.kind][1], self.shape))

    @property
    def flops(self) -> int:
        """Two per multiply-accumulate (the epilogue is not counted)."""
        n = 2
        for a in self.axes:
            n *= a.extent
        return n

    @property
    def extents(self) -> dict[str, int]:
        return {a.name: a.extent for a in self.axes}

    def axis(self, name: str) -> Axis:
        return next(a for a in self.axes if a.name == name)

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        return tuple(t for t in self.tensors if t.role == "input")

    @property
    def output(self) -> Tensor:
        return next(t for t in self.tensors if t.role == "output")

    @property
    def accesses(self) -> tuple[Access, ...]:
        return (self.out, self.lhs, self.rhs) + ((self.bias,) if self.bias else ())

    def needs_bounds_check(self, access: Access) -> bool:
        """True when some index of ``access`` can fall outside its tensor (padding)."""
        shape = self.tensor(access.tensor).shape
        return any(not (0 <= lo and hi < dim) for (lo, hi), dim in
                   zip((e.range(self.extents) for e in access.index), shape))

    def random_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Inputs as stored for ``dtype`` (bf16 as its bits, :mod:`kernels.ir.dtypes`)."""
        return {t.name: encode(rng.uniform(-INPUT_RANGE, INPUT_RANGE, t.shape).astype(np.float32), self.dtype)
                for t in self.inputs}

    def reference(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The exact result on the stored inputs (float64 math), as float32; a kernel's
        own roundings (tf32 inputs, a bf16/fp16 output) are the tolerance's business."""
        return self.reference_fn(**{n: decode(a, self.dtype) for n, a in inputs.items()}).astype(np.float32)

    def to_json(self) -> dict:
        d = {"op": self.kind, "shape": self.shape_str}
        return d if self.dtype == DEFAULT else {**d, "dtype": self.dtype}


# ---------------------------------------------------------------- references

def _conv2d_ref(inp, weight, stride, pad, groups):
    import numpy.lib.stride_tricks as st
    x = np.pad(inp.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    win = st.sliding_window_view(x, (r, s), axis=(2, 3))[:, :, ::stride, ::stride]  # n c oh ow r s
    if groups == 1:
        return np.einsum("ncyxrs,kcrs->nkyx", win, weight.astype(np.float64), optimize=True)
    return np.einsum("ncyxrs,crs->ncyx", win, weight[:, 0].astype(np.float64), optimize=True)


# ---------------------------------------------------------------- builders

def _matmul(m, n, k, bias=False):
    axes = (Axis("i", m), Axis("j", n), Axis("k", k, reduce=True))
    tensors = [Tensor("A", (m, k), "input"), Tensor("B", (k, n), "input")]
    if bias:
        tensors.append(Tensor("bias", (n,), "input"))
    tensors.append(Tensor("C", (m, n), "output"))
    if bias:
        ref = lambda A, B, bias: np.maximum(A.astype(np.float64) @ B + bias, 0)  # noqa: E731
    else:
        ref = lambda A, B: A.astype(np.float64) @ B  # noqa: E731
    return dict(axes=axes, tensors=tuple(tensors),
                out=Access("C", (Affine.of("i"), Affine.of("j"))),
                lhs=Access("A", (Affine.of("i"), Affine.of("k"))),
                rhs=Access("B", (Affine.of("k"), Affine.of("j"))),
                bias=Access("bias", (Affine.of("j"),)) if bias else None,
                reference_fn=ref)


def _batch_matmul(b, m, n, k):
    return dict(
        axes=(Axis("b", b), Axis("i", m), Axis("j", n), Axis("k", k, reduce=True)),
        tensors=(Tensor("A", (b, m, k), "input"), Tensor("B", (b, k, n), "input"),
                 Tensor("C", (b, m, n), "output")),
        out=Access("C", (Affine.of("b"), Affine.of("i"), Affine.of("j"))),
        lhs=Access("A", (Affine.of("b"), Affine.of("i"), Affine.of("k"))),
        rhs=Access("B", (Affine.of("b"), Affine.of("k"), Affine.of("j"))),
        reference_fn=lambda A, B: np.matmul(A.astype(np.float64), B))


def _out_size(size, r, stride, pad, what):
    out = (size + 2 * pad - r) // stride + 1
    if out < 1:
        raise OperatorError(f"{what}: a {r}-wide window with padding {pad} does not fit in {size}")
    return out


def _conv2d(n, c, h, w, k, r, s, stride=1, pad=0, bias=False):
    oh, ow = _out_size(h, r, stride, pad, "height"), _out_size(w, s, stride, pad, "width")
    tensors = [Tensor("I", (n, c, h, w), "input"), Tensor("W", (k, c, r, s), "input")]
    if bias:
        tensors.append(Tensor("bias", (k,), "input"))
        ref = lambda I, W, bias: np.maximum(_conv2d_ref(I, W, stride, pad, 1)  # noqa: E731
                                            + bias[None, :, None, None], 0)
    else:
        ref = lambda I, W: _conv2d_ref(I, W, stride, pad, 1)  # noqa: E731
    return dict(
        axes=(Axis("n", n), Axis("k", k), Axis("y", oh), Axis("x", ow),
              Axis("c", c, True), Axis("ry", r, True), Axis("rx", s, True)),
        tensors=(*tensors, Tensor("O", (n, k, oh, ow), "output")),
        out=Access("O", (Affine.of("n"), Affine.of("k"), Affine.of("y"), Affine.of("x"))),
        lhs=Access("I", (Affine.of("n"), Affine.of("c"),
                         Affine.of(("y", stride), "ry", const=-pad),
                         Affine.of(("x", stride), "rx", const=-pad))),
        rhs=Access("W", (Affine.of("k"), Affine.of("c"), Affine.of("ry"), Affine.of("rx"))),
        bias=Access("bias", (Affine.of("k"),)) if bias else None,
        reference_fn=ref)


def _depthwise_conv2d(n, c, h, w, r, s, stride=1, pad=0):
    oh, ow = _out_size(h, r, stride, pad, "height"), _out_size(w, s, stride, pad, "width")
    return dict(
        axes=(Axis("n", n), Axis("c", c), Axis("y", oh), Axis("x", ow),
              Axis("ry", r, True), Axis("rx", s, True)),
        tensors=(Tensor("I", (n, c, h, w), "input"), Tensor("W", (c, 1, r, s), "input"),
                 Tensor("O", (n, c, oh, ow), "output")),
        out=Access("O", (Affine.of("n"), Affine.of("c"), Affine.of("y"), Affine.of("x"))),
        lhs=Access("I", (Affine.of("n"), Affine.of("c"),
                         Affine.of(("y", stride), "ry", const=-pad),
                         Affine.of(("x", stride), "rx", const=-pad))),
        rhs=Access("W", (Affine.of("c"), Affine.of(), Affine.of("ry"), Affine.of("rx"))),
        reference_fn=lambda I, W: _conv2d_ref(I, W, stride, pad, c))


# kind -> (builder, parameter names, how many are optional)
OPERATORS: dict[str, tuple[Callable[..., dict], tuple[str, ...], int]] = {
    "matmul": (_matmul, ("M", "N", "K"), 0),
    "dense_bias_relu": (lambda m, n, k: _matmul(m, n, k, bias=True), ("M", "N", "K"), 0),
    "batch_matmul": (_batch_matmul, ("B", "M", "N", "K"), 0),
    "conv2d": (_conv2d, ("N", "C", "H", "W", "K", "R", "S", "stride", "pad"), 2),
    "depthwise_conv2d": (_depthwise_conv2d, ("N", "C", "H", "W", "R", "S", "stride", "pad"), 2),
    "conv2d_bias_relu": (lambda *shape: _conv2d(*shape, bias=True),
                         ("N", "C", "H", "W", "K", "R", "S", "stride", "pad"), 2),
}
# An epilogue variant schedules like the operator it extends: it shares that operator's
# expert, shipped policy and one-hot column in the observation.
BASE_KIND = {"conv2d_bias_relu": "conv2d"}
OPERATORS_ENV = "SCHEDGYM_OPERATORS"   # files of operators of your own, separated like PATH
OPTIONAL_DEFAULTS = (1, 0)  # stride, pad
MAX_ELEMENTS = 2 ** 31 - 1   # per tensor: generated code indexes with int


def shape_help(kind: str) -> str:
    _, names, optional = OPERATORS[kind]
    sep = "," if "conv" in kind else "x"
    required, opt = names[:len(names) - optional], names[len(names) - optional:]
    return sep.join(required) + "".join(f"[{sep}{o}" for o in opt) + "]" * len(opt)


def parse_shape(kind: str, shape: str | tuple[int, ...]) -> tuple[int, ...]:
    if kind not in OPERATORS:
        raise OperatorError(f"unknown op {kind!r}; known: {', '.join(OPERATORS)}")
    _, names, optional = OPERATORS[kind]
    if isinstance(shape, str):
        parts = [p for p in re.split(r"[x,X\s]+", shape.strip()) if p]
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            raise OperatorError(f"malformed shape {shape!r} for {kind}: expected integers "
                                f"{shape_help(kind)}") from None
    else:
        values = tuple(int(v) for v in shape)
    if not len(names) - optional <= len(values) <= len(names):
        raise OperatorError(f"shape {shape!r} for {kind} has {len(values)} numbers; "
                            f"expected {shape_help(kind)}")
    for name, v in zip(names, values):
        low = 0 if name == "pad" else 1
        if v < low:
            raise OperatorError(f"shape {shape!r} for {kind}: {name} must be "
                                f"{'non-negative' if low == 0 else 'positive'}, got {v}")
    missing = len(names) - len(values)
    return values + OPTIONAL_DEFAULTS[len(OPTIONAL_DEFAULTS) - missing:] if missing else values


def make_op(kind: str, shape: str | tuple[int, ...], dtype: str = DEFAULT) -> Operator:
    """The operator ``kind`` at ``shape`` (a shape string or a tuple of ints) in ``dtype``."""
    values = parse_shape(kind, shape)
    if dtype not in DTYPES:
        raise OperatorError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    builder = OPERATORS[kind][0]
    op = Operator(kind=kind, shape=values, dtype=dtype, **builder(*values))
    for t in op.tensors:
        if math.prod(t.shape) > MAX_ELEMENTS:
            raise OperatorError(f"{kind} {op.shape_str}: tensor {t.name} has {math.prod(t.shape):,} elements; "
                                f"kernels index with 32-bit int, so at most {MAX_ELEMENTS:,}")
    return op


def register(kind: str, builder: Callable[..., dict], params: tuple[str, ...]) -> None:
    """Add operator ``kind``: ``builder(*shape)`` returns its axes, tensors, accesses and
    numpy reference (as ``_matmul`` does); ``params`` names the shape's numbers. Called
    by the files that ``$SCHEDGYM_OPERATORS`` lists (README, "Adding an operator")."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", kind):
        raise OperatorError(f"operator name {kind!r}: lower-case letters, digits and _ only")
    if kind in OPERATORS:
        raise OperatorError(f"operator {kind!r} exists already")
    if not params or not all(isinstance(p, str) for p in params):
        raise OperatorError(f"operator {kind!r}: params must name the shape's numbers")
    OPERATORS[kind] = (builder, tuple(params), 0)


def run_user_file(path: str | os.PathLike, prefix: str, error: type[Exception]):
    """Import the Python file ``path`` as a module named ``prefix`` + its stem: code the
    user chose to run (an operator or model file, unlike the data files a user is
    handed). A missing file or any exception it raises becomes one ``error`` line."""
    if not Path(path).is_file():
        raise error(f"no file {str(path)!r}")
    spec = importlib.util.spec_from_file_location(f"{prefix}{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except error as e:
        raise error(f"{path}: {e}") from None
    except Exception as e:
        raise error(f"{path} failed to import: {type(e).__name__}: {e}") from None
    return module


def load_operators(path: str | os.PathLike) -> None:
    """Run the operator file ``path`` (your own code, by your choice: it calls ``register``)."""
    try:
        run_user_file(path, "schedgym_operators_", OperatorError)
    except OperatorError as e:
        raise OperatorError(f"${OPERATORS_ENV}: {e}") from None


def _load_operator_files() -> None:
    """The files ``$SCHEDGYM_OPERATORS`` lists; the measuring workers, started with this
    environment, load them too."""
    for path in (p for p in os.environ.get(OPERATORS_ENV, "").split(os.pathsep) if p):
        load_operators(path)


_load_operator_files()
