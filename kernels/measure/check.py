"""Is a kernel's output right? One check for every backend.

A speedup is the reward, so the check is what stands between the search and a kernel
that is fast because it is wrong. Each part closes a way to look right without being
right (ARCHITECTURE.md, "Measurement"):

- :func:`tolerance`: how far a correct fp32 kernel can be from the float64 reference,
  per operator (a global bound is either too loose for a short reduction or too tight
  for a long one);
- :class:`Guarded`: every buffer sits between two canary margins, so a write just
  before or after a tensor is seen;
- :func:`check_call`: margins intact, output within tolerance, inputs untouched and,
  for a repeat call, the output bit for bit the first call's.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..ir.dtypes import DEFAULT, DTYPES, decode, word_type
from ..ir.ops import INPUT_RANGE, Operator


# ---------------------------------------------------------------- tolerance

@dataclass(frozen=True)
class Precision:
    """The arithmetic a kernel of one dtype computes in."""

    unit_roundoff: float        # u: the largest relative error of one accumulation step
    input_roundoff: float = 0.0   # the kernel's own rounding of each input (tf32 on tensor cores)
    output_roundoff: float = 0.0  # the rounding of the finished sum to the stored output (bf16, fp16)


# Keyed by dtype (kernels.ir.dtypes). Tensor-core dtypes accumulate in fp32, but the
# instruction's adder truncates rather than rounds (Fasi et al., "Numerical behavior of
# NVIDIA tensor cores", 2021): twice fp32's unit roundoff.
PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(unit_roundoff=2.0 ** -24),
    "tf32": Precision(unit_roundoff=2.0 ** -23, input_roundoff=2.0 ** -11),
    "bf16": Precision(unit_roundoff=2.0 ** -23, output_roundoff=2.0 ** -8),
    "fp16": Precision(unit_roundoff=2.0 ** -23, output_roundoff=2.0 ** -11),
}

ATOL_SIGMAS = 8.0   # standard deviations of the rounding error a correct kernel may reach


@dataclass(frozen=True)
class Tolerance:
    """numpy ``allclose`` form: ``|out - ref| <= atol + rtol * |ref|`` everywhere."""

    atol: float
    rtol: float

    def violation(self, out: np.ndarray, ref: np.ndarray) -> str | None:
        """Why ``out`` is not close to ``ref``; None when it is."""
        finite = np.isfinite(out)
        if not finite.all():
            return f"NaN or inf in output ({int(out.size - finite.sum())} of {out.size} elements)"
        ref64 = ref.astype(np.float64)
        diff = np.abs(out.astype(np.float64) - ref64)
        allowed = self.atol + self.rtol * np.abs(ref64)
        excess = diff - allowed
        if out.size == 0 or excess.max() <= 0:
            return None
        i = int(np.argmax(excess))
        where = [int(x) for x in np.unravel_index(i, out.shape)]
        bad = int((excess > 0).sum())
        return (f"max err {diff.flat[i]:.1e} at {where}, allowed {allowed.flat[i]:.1e} "
                f"({bad} of {out.size} elements out of tolerance)")


def reduction_length(op: Operator) -> int:
    """How many products are summed into each output element (K of a matmul, C*R*S of
    a convolution, R*S of a depthwise one)."""
    return math.prod(a.extent for a in op.axes if a.reduce)


def tolerance(op: Operator) -> Tolerance:
    """How far a correct kernel of ``op`` (computing in ``op.dtype``) may be from the reference.

    Each output is a sum of K = :func:`reduction_length` products ``a*b`` of inputs drawn
    uniformly from [-r, r] (r = ``INPUT_RANGE``), computed in ``dtype`` in whatever order
    the schedule gives (tiles, a reordered reduction, vector lanes, FMA or not) and
    compared with a float64 reference rounded to ``dtype``. With u the unit roundoff:

    - atol: each of the K additions rounds the running sum, an error of up to
      u * |running sum|. The products have mean 0 and rms sigma_p = r**2 / 3, so the
      running sum is typically sqrt(K) * sigma_p, and K independent roundings of that
      size add up like a random walk to sqrt(K) * u * sqrt(K) * sigma_p = K * u * sigma_p
      (simulated sequential fp32 sums, with and without FMA, in both directions, for K
      from 2 to 4608: a standard deviation of 0.2-0.46 of that, and a maximum over
      3 * 10**3 to 2 * 10**5 sums of at most 4 of it; summing in vector lanes gives less). ``atol =
      ATOL_SIGMAS * K * u * sigma_p`` leaves room for that maximum over every output
      element, however many, and stays far below the error of a real mistake: a dropped
      or repeated product is off by |a*b|, up to r**2, which is more than atol for any
      K below ~6 * 10**6 (and a wrong index or a missed tile gives errors of order
      sqrt(K) * sigma_p).
    - rtol: errors proportional to the result itself: the reference's own rounding to
      ``dtype`` (u), the rounding of a product (u) and of the epilogue (a bias add, u),
      and partial sums combined pairwise (vector lanes, split reductions), whose error
      bound grows with their depth, log2(K) * u. ``rtol = 4 * u * log2(2K)``: a few ulps
      (an ulp at 1 is 2u) times log2 of the reduction length.

    The reference is computed from the stored inputs (already rounded to bf16 or fp16),
    so only the kernel's own roundings add to this:

    - a 16-bit output (u_out = 2**-8 for bf16, 2**-11 for fp16) is the sum rounded once:
      ``rtol += 2 * u_out``;
    - tf32 rounds each input to 10 mantissa bits inside the tensor core (u_in = 2**-11):
      each product is off by up to 2 * u_in of itself, K of them a random walk of
      sqrt(K) * 2 * u_in * sigma_p: ``atol += ATOL_SIGMAS * sqrt(K) * 2 * u_in * sigma_p``.
    """
    p = PRECISIONS[op.dtype]
    u = p.unit_roundoff
    k = reduction_length(op)
    sigma_p = INPUT_RANGE ** 2 / 3.0    # rms of a product of two U(-r, r) inputs
    atol = ATOL_SIGMAS * sigma_p * (k * u + math.sqrt(k) * 2 * p.input_roundoff)
    return Tolerance(atol=atol, rtol=4.0 * u * math.log2(2 * k) + 2 * p.output_roundoff)


# ---------------------------------------------------------------- guard zones


def random_canary(rng: np.random.Generator, dtype: str = DEFAULT) -> int:
    """A quiet-NaN bit pattern of ``dtype`` with a random payload, never the NaN arithmetic
    produces: a kernel cannot predict it, and one that reads a margin as data gets NaN."""
    d = DTYPES[dtype]
    return d.quiet_nan | int(rng.integers(1, 1 << d.payload_bits))


def margin_words(nbytes: int, word_bytes: int = 4) -> int:
    """Words of canary on each side of a buffer of ``nbytes``: 64 bytes, or a page
    for buffers larger than a page (an off-by-one row of a big matrix is a long write)."""
    return (4096 if nbytes > 4096 else 64) // word_bytes


@dataclass(frozen=True)
class Guarded:
    """A tensor of ``dtype`` inside one allocation with canary-filled margins before and
    after it. The kernel gets the interior (:attr:`array`, as stored: float32, float16, or
    bf16 bits); ``raw`` is the whole allocation as unsigned words of the element's size,
    on the host (numpy) or the device (CuPy)."""

    raw: Any
    margin: int             # words in each margin
    shape: tuple[int, ...]
    canary: int
    dtype: str = DEFAULT

    @classmethod
    def alloc(cls, xp: Any, shape: tuple[int, ...], canary: int, data: Any = None,
              dtype: str = DEFAULT) -> "Guarded":
        """A guarded buffer from array module ``xp`` (numpy or CuPy) holding ``data``, or NaN."""
        size = math.prod(shape)
        wb = DTYPES[dtype].bytes
        margin = margin_words(wb * size, wb)
        words = size + 2 * margin
        if xp is np:   # CuPy's allocations are 256-byte aligned
            # Fresh pages of the OS, not the heap: where the heap puts a buffer depends on what
            # the process allocated before (the library's calls), and a kernel's speed on where
            # its buffers lie (one timed at 0.93 of another after torch had run, 1.04 before).
            # Page-aligned, so the interior, a margin in, starts on a cache line; in huge pages
            # where the system gives them, as numpy asks for its arrays (a matrix-vector product
            # reading 16 MB ran 1.5x slower in 4 KiB pages, missing the TLB).
            pages = mmap.mmap(-1, wb * words, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                pages.madvise(mmap.MADV_HUGEPAGE)
            raw = np.frombuffer(pages, word_type(dtype))
        else:
            raw = xp.empty(words, word_type(dtype))
        raw[:margin] = canary
        raw[margin + size:] = canary
        g = cls(raw, margin, tuple(shape), canary, dtype)
        if data is None:
            g.fill_nan()
        else:
            g.array[...] = data
        return g

    @property
    def array(self) -> Any:
        """The interior, the tensor the kernel sees (a view into ``raw``)."""
        return self.interior(self.raw)

    def fill_nan(self) -> None:
        """Fill the interior with the dtype's plain quiet NaN."""
        self.words(self.raw).fill(DTYPES[self.dtype].quiet_nan)

    def words(self, raw: Any) -> Any:
        """The interior of ``raw`` as unsigned words (what bit-for-bit comparisons use)."""
        return raw[self.margin:len(raw) - self.margin].reshape(self.shape)

    def interior(self, raw: Any) -> Any:
        """The tensor inside ``raw`` (this buffer's words, or a host copy of them), as stored."""
        view = {"fp32": np.float32, "tf32": np.float32, "fp16": np.float16}.get(self.dtype)
        words = self.words(raw)
        return words if view is None else words.view(view)

    def values(self, raw: Any) -> np.ndarray:
        """The float32 values inside ``raw``, a host copy of the words."""
        return decode(self.interior(raw), self.dtype)

    def overrun(self, raw: np.ndarray) -> str | None:
        """Which margin of ``raw`` (a host copy of the words) a kernel wrote to, if any."""
        if not np.all(raw[:self.margin] == self.canary):
            return "before the start"
        if not np.all(raw[len(raw) - self.margin:] == self.canary):
            return "after the end"
        return None


# ---------------------------------------------------------------- the check

def check_call(buffers: dict[str, Guarded], raws: dict[str, np.ndarray], out_name: str,
               ref: np.ndarray, inputs: dict[str, np.ndarray], tol: Tolerance,
               call: str | None = None, first: np.ndarray | None = None) -> str | None:
    """Why the call just made is wrong; None when it is right.

    ``raws`` are the words of ``buffers`` after the call, on the host; ``call`` names a
    call other than the first (``"timed call 5"``), ``first`` is the first call's output,
    which a repeat must reproduce bit for bit (generated kernels reduce each element in
    one thread, in a fixed order).
    """
    on = f" on {call}" if call else ""
    for name, g in buffers.items():
        side = g.overrun(raws[name])
        if side:
            return f"wrote out of bounds of {name} ({side}){on}"
    g = buffers[out_name]
    why = tol.violation(g.values(raws[out_name]), ref)
    if why:
        return f"wrong result{on}: {why}"
    for name, a in inputs.items():
        g_in = buffers[name]
        if not np.array_equal(g_in.words(raws[name]), a.view(word_type(g_in.dtype))):
            return f"wrong result{on}: kernel wrote to input {name}"
    if first is not None:
        out = g.words(raws[out_name])
        differ = np.flatnonzero(out != first.view(out.dtype))
        if differ.size:
            where = [int(x) for x in np.unravel_index(int(differ[0]), out.shape)]
            return (f"nondeterministic output: {call} differs from the first call in "
                    f"{differ.size} element(s), first at {where}")
    return None
