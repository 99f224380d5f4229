"""Where the tensor-core instructions keep their operands: which thread of a warp holds
which element of each fragment (PTX ISA, "Matrix Fragments for mma.m16n8k16" and
"mma.m16n8k8", .tf32/.bf16/.f16 with fp32 accumulators).

A thread's lane ``l`` (0-31) splits into ``g = l // 4`` (its group) and ``t = l % 4``
(its place in the group). Each entry below is one register, as the (row, col) of the
elements it holds, in terms of ``g`` and ``t`` given as offsets ``(g coefficient,
t coefficient, constant)``; a 16-bit register holds two elements, the first in its
low half.
"""

from __future__ import annotations

# (row, col) = (rg*g + rt*t + rc, cg*g + ct*t + cc), each as (g coef, t coef, const)
Coord = tuple[tuple[int, int, int], tuple[int, int, int]]

# m16n8k16, 16-bit inputs: A (16 x 16, row major) 4 registers of 2, B (16 x 8) 2 of 2
A16: tuple[tuple[Coord, ...], ...] = tuple(
    tuple(((1, 0, r), (0, 2, c + h)) for h in (0, 1)) for r, c in ((0, 0), (8, 0), (0, 8), (8, 8)))
B16: tuple[tuple[Coord, ...], ...] = tuple(
    tuple(((0, 2, k + h), (1, 0, 0)) for h in (0, 1)) for k in (0, 8))
# m16n8k8, tf32: A (16 x 8) 4 registers of 1, B (8 x 8) 2 of 1
A8: tuple[tuple[Coord, ...], ...] = tuple(
    (((1, 0, r), (0, 1, c)),) for r, c in ((0, 0), (8, 0), (0, 4), (8, 4)))
B8: tuple[tuple[Coord, ...], ...] = tuple((((0, 1, k), (1, 0, 0)),) for k in (0, 4))
# the fp32 accumulator (16 x 8), both shapes: 4 registers of 1
C: tuple[Coord, ...] = tuple(((1, 0, r), (0, 2, c)) for r, c in ((0, 0), (0, 1), (8, 0), (8, 1)))


def fragments(mma_k: int) -> tuple[tuple, tuple]:
    """(A's registers, B's registers) for the instruction with this k."""
    return (A16, B16) if mma_k == 16 else (A8, B8)


INSTRUCTIONS = {
    "tf32": "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
    "fp32": "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",   # three a tile (3xTF32)
    "bf16": "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
    "fp16": "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
}
