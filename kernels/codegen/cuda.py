"""CUDA backend: GPU rules for a schedule, its launch configuration, and the renderer.

A bound loop's iterations run as blocks (``blockIdx``) or threads (``threadIdx``) of
one launch: grid and block sizes are the bound loops' extents, so each thread runs
the nest with its bound loops fixed to its indices. On CUDA:

- the output is cached (``cache_write``) at or inside every bound loop: each thread
  accumulates its own outputs in registers and writes each one once;
- a ``cache_read`` anchored inside every blockIdx loop stages, in shared memory,
  what the whole block reads below the anchor (all threadIdx loops count as inside
  it); the block's threads fill it together, then ``__syncthreads()``, and again
  before it is refilled. All stages live in one dynamic ``extern __shared__`` array
  (the kernel's ``shared_bytes``, given at launch), so a block may use what the GPU
  lets it opt in to, beyond the 48 KiB of static arrays;
- tails of non-divisible splits that concern a thread's tile or its thread index
  are not guarded in the compute (reads are clamped) but at the write-back, so all
  threads of a block take the same path through every barrier;
- ``vectorize`` moves four consecutive floats as one ``float4`` where the address
  is provably 16-byte aligned, otherwise it is a loop unrolled by nvcc; ``unroll``
  is ``#pragma unroll`` over a constant trip count (a guarded tail inside);
- bf16 and fp16 tensors (and their shared stages) hold ``unsigned short`` bits,
  converted to float where they are read and back where the output is written (PTX
  ``cvt``, so no CUDA header is needed); copies move the bits, 16 bytes at a time
  where aligned;
- a tensorized nest (:class:`kernels.ir.lower.Mma`) issues ``mma.sync`` through
  inline PTX; each thread of the nest is a warp, its lane ``threadIdx.x % 32``. An
  fp32 nest runs as 3xTF32: each operand register is split into a tf32 high part and
  a tf32 remainder (a second fragment array, ``_lo``), and each tile takes three
  instructions (remainder x high, high x remainder, high x high);
- a warpgroup nest (:class:`kernels.ir.lower.Wgmma`, sm_90a) issues ``wgmma`` on
  shared-memory descriptors: its stages are written through the 128-byte swizzle
  (16-byte chunk ``c`` of 128-byte row ``r`` at chunk ``c ^ (r % 8)``, on the shared
  address, from a 1024-byte aligned base) that the descriptors declare, and each
  barrier first makes the copies visible to the tensor cores' reads
  (``fence.proxy.async``).

An unscheduled operator (no steps) runs with :func:`default_schedule`: one thread
per output element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..ir.dtypes import DTYPES
from ..ir.expr import DivMod, Lin
from ..ir.lower import (LANE, LANE_GROUP, LANE_PLACE, Add, Alloc, Commit, For, Fragment, Function, If, Load, Mma, Mul,
                        Relu, Store, StorePair, Sync, Wait, Wgmma, WgmmaCommit, WgmmaFence, WgmmaWait, lower, stage_bytes)
from ..ir.mma import INSTRUCTIONS
from ..ir.schedule import WARP, Schedule, b_k_major
from ..target import Target
from .cstyle import CStyleRenderer
from .kernel import Kernel
from .rules import WGMMA_ALIGN, WGMMA_ARCH, Launch, check_for_target, default_schedule, launch_config


@dataclass(frozen=True)
class _Lane:
    """Lane ``comp`` of a float4 already loaded into ``name``."""
    name: str
    comp: str


def _bound_vars(stmts) -> list[tuple[str, str]]:
    """(loop variable, GPU axis) of every bound loop in ``stmts``."""
    out = []
    for s in stmts:
        if isinstance(s, For) and s.kind.startswith("bind:"):
            out.append((s.var, s.kind[len("bind:"):]))
        if isinstance(s, (For, If)):
            out += _bound_vars(s.body)
    return out


def _has_commit(stmts) -> bool:
    return any(isinstance(s, Commit) or isinstance(s, (For, If)) and _has_commit(s.body) for s in stmts)


def _loads(v) -> list[Load]:
    if isinstance(v, Load):
        return [v]
    if isinstance(v, (Mul, Add)):
        return _loads(v.a) + _loads(v.b)
    if isinstance(v, Relu):
        return _loads(v.a)
    return []


def _shift(v, var: str, lane: int, vectors: dict[int, str]):
    """``v`` at ``var + lane``; loads already in a float4 become that vector's lane."""
    if isinstance(v, Load):
        if id(v) in vectors:
            return _Lane(vectors[id(v)], "xyzw"[lane])
        to = Lin.var(var) + lane
        return Load(v.buffer, v.index.subst(var, to), tuple((e.subst(var, to), n) for e, n in v.bounds),
                    tuple((e.subst(var, to), n, s) for e, n, s in v.clamps))
    if isinstance(v, Mul):
        return Mul(_shift(v.a, var, lane, vectors), _shift(v.b, var, lane, vectors))
    if isinstance(v, Add):
        return Add(_shift(v.a, var, lane, vectors), _shift(v.b, var, lane, vectors))
    if isinstance(v, Relu):
        return Relu(_shift(v.a, var, lane, vectors))
    return v


def _cp_async_helpers() -> tuple[str, ...]:
    """``cp_asyncN`` (sm_80+): N = 16, 8 or 4 bytes from global to shared memory without
    passing registers; ``cp_asyncNz``: N zero bytes where ``!full`` (nothing is read then).
    16 bytes bypass L1 (``.cg``), which moves 16 only: 8 and 4 go through it (``.ca``)."""
    to_shared = ('  unsigned s; asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" '
                 ': "=r"(s) : "l"(dst));')
    lines = ["#ifndef SCHEDGYM_ASYNC_HELPERS", "#define SCHEDGYM_ASYNC_HELPERS"]
    for n in (16, 8, 4):
        copy = f"cp.async.{'cg' if n == 16 else 'ca'}.shared.global [%0], [%1], {n}"
        lines += [f"static __device__ __forceinline__ void cp_async{n}(void* dst, const void* src) {{", to_shared,
                  f'  asm volatile("{copy};" :: "r"(s), "l"(src) : "memory");', "}",
                  f"static __device__ __forceinline__ void cp_async{n}z(void* dst, const void* src, bool full) {{",
                  to_shared, f'  asm volatile("{copy}, %2;" :: "r"(s), "l"(src), "r"(full ? {n} : 0) : "memory");',
                  "}"]
    return (*lines, "#endif")


class CUDARenderer(CStyleRenderer):
    """CUDA C for NVRTC/nvcc: bound loops become block and thread indices."""

    local_decl = "float {name}[{size}];"
    shared_array = "schedgym_shared"   # the dynamic shared memory every stage is a part of
    preamble = ("#ifndef SCHEDGYM_CUDA_HELPERS",
                "#define SCHEDGYM_CUDA_HELPERS",
                "static __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }",
                "#endif",
                "")
    lanes = 4  # float4
    # 16-bit dtypes: conversions through PTX (sm_80+), no header needed; pack2 joins two
    # 16-bit elements into one 32-bit register, the first in the low half
    dtype_helpers = (
        "#ifndef SCHEDGYM_DTYPE_HELPERS",
        "#define SCHEDGYM_DTYPE_HELPERS",
        "static __device__ __forceinline__ float bf2f(unsigned short x) { return __uint_as_float(((unsigned)x) << 16); }",
        "static __device__ __forceinline__ unsigned short f2bf(float x) "
        "{ unsigned short r; asm(\"cvt.rn.bf16.f32 %0, %1;\" : \"=h\"(r) : \"f\"(x)); return r; }",
        "static __device__ __forceinline__ float h2f(unsigned short x) "
        "{ float r; asm(\"cvt.f32.f16 %0, %1;\" : \"=f\"(r) : \"h\"(x)); return r; }",
        "static __device__ __forceinline__ unsigned short f2h(float x) "
        "{ unsigned short r; asm(\"cvt.rn.f16.f32 %0, %1;\" : \"=h\"(r) : \"f\"(x)); return r; }",
        "static __device__ __forceinline__ unsigned tf32(float x) "
        "{ unsigned r; asm(\"cvt.rna.tf32.f32 %0, %1;\" : \"=r\"(r) : \"f\"(x)); return r; }",
        "static __device__ __forceinline__ unsigned pack2(unsigned short lo, unsigned short hi) "
        "{ return (unsigned)lo | ((unsigned)hi << 16); }",
        "static __device__ __forceinline__ unsigned smem_u32(const void* p) "
        "{ unsigned s; asm(\"{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }\" : \"=r\"(s) : \"l\"(p)); return s; }",
        "#endif",
    )
    async_helpers = _cp_async_helpers()
    # wgmma (sm_90a): the 128-byte swizzle of a shared address, copies to a (swizzled) shared
    # address, and a shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor
    # Format": start, leading and stride byte offsets in 16-byte units, 128-byte swizzle):
    # 8-row groups 1024 bytes apart; ``block``: bytes between 64-column blocks of B
    wgmma_helpers = (
        "#ifndef SCHEDGYM_WGMMA_HELPERS",
        "#define SCHEDGYM_WGMMA_HELPERS",
        "static __device__ __forceinline__ unsigned swizzle128(unsigned s) { return s ^ (((s >> 7) & 7) << 4); }",
        "static __device__ __forceinline__ void cp_async16s(unsigned dst, const void* src) {",
        "  asm volatile(\"cp.async.cg.shared.global [%0], [%1], 16;\" :: \"r\"(dst), \"l\"(src) : \"memory\");",
        "}",
        "static __device__ __forceinline__ void cp_async16sz(unsigned dst, const void* src, bool full) {",
        "  asm volatile(\"cp.async.cg.shared.global [%0], [%1], 16, %2;\" :: \"r\"(dst), \"l\"(src), "
        "\"r\"(full ? 16 : 0) : \"memory\");",
        "}",
        "static __device__ __forceinline__ void cp_async4s(unsigned dst, const void* src) {",
        "  asm volatile(\"cp.async.ca.shared.global [%0], [%1], 4;\" :: \"r\"(dst), \"l\"(src) : \"memory\");",
        "}",
        "static __device__ __forceinline__ void cp_async4sz(unsigned dst, const void* src, bool full) {",
        "  asm volatile(\"cp.async.ca.shared.global [%0], [%1], 4, %2;\" :: \"r\"(dst), \"l\"(src), "
        "\"r\"(full ? 4 : 0) : \"memory\");",
        "}",
        "static __device__ __forceinline__ unsigned long long wgmma_desc(const void* p, unsigned block) {",
        "  return (unsigned long long)((smem_u32(p) & 0x3FFFF) >> 4) | ((unsigned long long)(block >> 4) << 16)",
        "       | (64ull << 32) | (1ull << 62);",
        "}",
        "#endif",
    )
    to_float = {"bf16": "bf2f", "fp16": "h2f"}
    from_float = {"bf16": "f2bf", "fp16": "f2h"}

    def __init__(self, target: Target, launch: Launch, dtype: str = "fp32", tensorized: bool = False,
                 warpgroup: bool = False):
        super().__init__(target)
        self.launch = launch
        self.dtype, self.tensorized, self.warpgroup = dtype, tensorized, warpgroup
        self.ctype = DTYPES[dtype].c_type
        self.split = DTYPES[dtype].split   # a tensorized nest runs as 3xTF32
        self.tf32 = DTYPES[dtype].mma_k == 8 and DTYPES[dtype].bytes == 4   # 32-bit operands, tf32 instruction
        self.registers: set[str] = set()   # local buffers: indexed by constants, never by pointer
        self.narrow: set[str] = set()      # buffers of 16-bit elements (bf16, fp16 bits)
        self.asynchronous = False          # cp.async copies (double-buffered stages)
        self.shared: dict[str, int] = {}   # stage -> its byte offset in the shared array
        self.shared_bytes = 0

    def render(self, fn: Function) -> str:
        self.registers = set(fn.local_buffers)
        self.shared, self.shared_bytes = {}, 0
        for name, size in fn.shared_buffers.items():
            self.shared[name] = self.shared_bytes
            self.shared_bytes += stage_bytes(size, self.dtype)
        if self.warpgroup:   # room to start the stages at a 1024-byte boundary
            self.shared_bytes += WGMMA_ALIGN
        self.asynchronous = _has_commit(fn.body)
        if DTYPES[self.dtype].bytes == 2:
            self.narrow = {t.name for t in fn.params} | set(fn.shared_buffers)
        grid, block = self.launch
        params = ", ".join(f"{'const ' if t.role == 'input' else ''}{self.ctype}* __restrict__ {t.name}"
                           for t in fn.params)
        lines = list(self.preamble)
        if self.dtype != "fp32" or self.tensorized:
            lines[-1:-1] = self.dtype_helpers
        if self.asynchronous:
            lines[-1:-1] = self.async_helpers
        if self.warpgroup:
            lines[:0] = [f"// {WGMMA_ARCH}: wgmma"]
            lines[-1:-1] = self.wgmma_helpers
        lines.append(f"// launch: grid ({', '.join(map(str, grid))}), block ({', '.join(map(str, block))}), "
                     f"shared memory {self.shared_bytes} bytes")
        lines.append(f'extern "C" __global__ void __launch_bounds__({math.prod(block)}) {fn.name}({params}) {{')
        if self.shared and self.warpgroup:
            raw = f"{self.shared_array}_raw"
            lines.append(f"{self.indent}extern __shared__ __align__(16) unsigned char {raw}[];")
            lines.append(f"{self.indent}unsigned char* const {self.shared_array} = "
                         f"{raw} + ((0u - smem_u32({raw})) & {WGMMA_ALIGN - 1}u);")
            lines.append(f"{self.indent}const unsigned {self.shared_array}_s = smem_u32({self.shared_array});")
        elif self.shared:
            lines.append(f"{self.indent}extern __shared__ __align__(16) unsigned char {self.shared_array}[];")
        # A bound loop's index is the same wherever the loop sits, so it is declared up
        # front: a block's cooperative copy outside a thread loop needs the thread index.
        for var, axis in _bound_vars(fn.body):
            warps = f" / {WARP}" if self.tensorized and axis == "threadIdx.x" else ""
            lines.append(f"{self.indent}const int {var} = (int){axis}{warps};")
        if self.tensorized:
            lines.append(f"{self.indent}const int {LANE} = (int)threadIdx.x % {WARP}, "
                         f"{LANE_GROUP} = {LANE} / 4, {LANE_PLACE} = {LANE} % 4, tc_r = {LANE} % 8, tc_m = {LANE} / 8;")
            lines.append(f"{self.indent}unsigned tc_fence = 0;   // renewed at each barrier: see ldmatrix")
        for s in fn.body:
            lines += self.stmt(s, 1)
        lines.append("}")
        return "\n".join(lines) + "\n"

    def expr(self, e: Lin) -> str:
        """Like ``str(e)``, but a division or modulo of a sum keeps its parentheses, and
        what a divisor divides is taken out of it (:meth:`Lin.taken_out`)."""
        e = e.taken_out()
        parts = []
        for atom, coef in e.terms:
            if isinstance(atom, DivMod):
                s = f"(({self.expr(atom.arg)}) {'/' if atom.op == 'div' else '%'} {atom.divisor})"
            else:
                s = atom
            parts.append(s if coef == 1 else f"{s}*{coef}")
        if e.const or not parts:
            parts.append(str(e.const))
        return " + ".join(parts).replace("+ -", "- ")

    def stmt(self, s, depth: int) -> list[str]:
        pad = self.indent * depth
        if isinstance(s, Sync):
            if self.warpgroup:   # this thread's copies, visible to wgmma's reads after the barrier
                return [f'{pad}asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); __syncthreads();']
            if self.tensorized:
                return [f'{pad}__syncthreads(); asm volatile("" : "+r"(tc_fence) :: "memory");']
            return [f"{pad}__syncthreads();"]
        if isinstance(s, Alloc) and s.scope == "shared":
            return [f"{pad}{self.ctype}* const {s.buffer} = ({self.ctype}*)({self.shared_array} + {self.shared[s.buffer]});"]
        if isinstance(s, Alloc) and s.scope == "fragment":
            also = f", {s.buffer}_lo[{s.size}]" if self.split else ""
            return [f"{pad}unsigned {s.buffer}[{s.size}]{also};"]
        if isinstance(s, Fragment):
            return self.fragment(s, depth)
        if isinstance(s, Mma):
            return self.mma(s, depth)
        if isinstance(s, Wgmma):
            return self.wgmma(s, depth)
        if isinstance(s, WgmmaFence):
            return [f'{pad}asm volatile("wgmma.fence.sync.aligned;" ::: "memory");']
        if isinstance(s, WgmmaCommit):
            return [f'{pad}asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");']
        if isinstance(s, WgmmaWait):
            lines = [f'{pad}asm volatile("wgmma.wait_group.sync.aligned {s.pending};" ::: "memory");']
            if s.size:   # each accumulator pinned after the wait (else ptxas serializes the wgmma)
                lines += [f"{pad}#pragma unroll", f"{pad}for (int wg_r = 0; wg_r < {s.size}; ++wg_r) "
                          f'asm volatile("" : "+f"({s.acc}[wg_r]) :: "memory");']
            return lines
        if isinstance(s, Commit):
            return [f'{pad}asm volatile("cp.async.commit_group;" ::: "memory");']
        if isinstance(s, Wait):
            return [f'{pad}asm volatile("cp.async.wait_group {s.pending};" ::: "memory");']
        if isinstance(s, StorePair):
            lo, hi = (f"{self.from_float[self.dtype]}({self.value(v)})" for v in (s.lo, s.hi))
            return [f"{pad}*(unsigned*)&{s.buffer}[{self.expr(s.index)}] = pack2({lo}, {hi});"]
        if isinstance(s, Store) and s.copy_async and self.warpgroup and isinstance(s.value, Load):
            return self.element_copy(s, depth)
        if isinstance(s, Store) and s.buffer in self.narrow:
            if isinstance(s.value, Load) and s.value.buffer in self.narrow:   # a copy: the bits
                v = self.raw(s.value)
            else:
                v = f"{self.from_float[self.dtype]}({self.value(s.value)})"
            return [f"{pad}{s.buffer}[{self.expr(s.index)}] = {v};"]
        return super().stmt(s, depth)

    def element_copy(self, store: Store, depth: int) -> list[str]:
        """One 32-bit element into a swizzled stage (a transposed B of tf32 wgmma): a 4-byte
        ``cp.async``, zeros outside the tensor."""
        if DTYPES[self.dtype].bytes != 4 or store.value.clamps:
            raise ValueError(f"cannot copy {store.value.buffer!r} element by element into a swizzled stage")
        load, dst = store.value, self.swizzled(store.buffer, store.index)
        if not load.bounds:
            return [f"{self.indent * depth}cp_async4s({dst}, &{self.ref(load)});"]
        guard = self.in_bounds(load)
        return [f"{self.indent * depth}cp_async4sz({dst}, ({guard}) ? &{self.ref(load)} : {load.buffer}, {guard});"]

    def swizzled(self, buffer: str, index: Lin) -> str:
        """The shared address of ``buffer[index]`` in a warpgroup kernel, 128-byte swizzled:
        the swizzle of its offset from the 1024-byte aligned start of the stages (the same
        bits as the address's), so that the compiler folds the constant parts."""
        elem = 2 if buffer in self.narrow else 4
        return (f"{self.shared_array}_s + swizzle128({self.shared[buffer]}u + "
                f"(unsigned)({self.expr(index)})*{elem}u)")

    def raw(self, load: Load) -> str:
        """A 16-bit element's bits; zero bits (+0.0) outside the tensor."""
        ref = self.ref(load)
        return f"(({self.in_bounds(load)}) ? {ref} : (unsigned short)0)" if load.bounds else ref

    def value(self, v) -> str:
        if isinstance(v, _Lane):
            return f"{v.name}.{v.comp}"
        if isinstance(v, Load) and v.buffer in self.narrow:
            return f"{self.to_float[self.dtype]}({self.raw(v)})"
        return super().value(v)

    def fragment(self, s: Fragment, depth: int) -> list[str]:
        """An operand's registers ``buffer[index + r]``: loaded by ``ldmatrix`` from a shared
        stage where the fragment's rows allow, else element by element."""
        pad, inner = self.indent * depth, self.indent * (depth + 1)
        lines = [f"{pad}{{"]
        matrix = self.ldmatrix(s.regs, inner)
        if matrix:
            lines += matrix
        else:
            for i, reg in enumerate(s.regs):
                if self.split:   # the value kept for its remainder
                    lines.append(f"{inner}const float f{i} = {self.value(reg[0])};")
                    r = f"tf32(f{i})"
                elif self.tf32:
                    r = f"tf32({self.value(reg[0])})"
                elif self.paired(*reg):
                    r = f"*(const unsigned*)&{self.ref(reg[0])}"
                else:
                    r = f"pack2({self.raw(reg[0])}, {self.raw(reg[1])})"
                lines.append(f"{inner}const unsigned r{i} = {r};")
        lines += [f"{inner}{s.buffer}[{self.expr(s.index + i)}] = r{i};" for i in range(len(s.regs))]
        if self.split:   # the remainder, exact in fp32, rounded to tf32 in its turn
            lines += [f"{inner}{s.buffer}_lo[{self.expr(s.index + i)}] = tf32(f{i} - __uint_as_float(r{i}));"
                      for i in range(len(s.regs))]
        return lines + [f"{pad}}}"]

    def mma(self, s: Mma, depth: int) -> list[str]:
        """One ``mma.sync`` on the fragments' registers, accumulating into four of the
        thread's accumulators; three for a split (3xTF32) dtype, the small terms first."""
        (a, ai), (b, bi) = s.a, s.b
        accs = ", ".join(f'"+f"({s.acc}[{self.expr(s.base + c)}])' for c in range(4))
        pairs = ((f"{a}_lo", b), (a, f"{b}_lo"), (a, b)) if self.split else ((a, b),)
        lines = []
        for fa, fb in pairs:
            regs = [f"{fa}[{self.expr(ai + i)}]" for i in range(4)] + [f"{fb}[{self.expr(bi + i)}]" for i in range(2)]
            ins = ", ".join(f'"r"({r})' for r in regs)
            lines.append(f'{self.indent * depth}asm volatile("{INSTRUCTIONS[s.dtype]} {{%0, %1, %2, %3}}, '
                         f'{{%4, %5, %6, %7}}, {{%8, %9}}, {{%0, %1, %2, %3}};" : {accs} : {ins});')
        return lines

    def wgmma(self, s: Wgmma, depth: int) -> list[str]:
        """One ``wgmma.m64nNk*`` of the warpgroup: A (K-major) and B (16-bit: read
        transposed, its rows along n; tf32: K-major) through descriptors of their swizzled
        stages, accumulating into the thread's ``n / 2`` accumulators from ``base``."""
        (a, ai), (b, bi) = s.a, s.b
        n_acc = s.n // 2
        ty = {"tf32": "tf32", "bf16": "bf16", "fp16": "f16"}[s.dtype]
        k_major = b_k_major(s.dtype)
        outs = ", ".join(f"%{i}" for i in range(n_acc))
        accs = ", ".join(f'"+f"({s.acc}[{self.expr(s.base + i)}])' for i in range(n_acc))
        descs = (f'"l"(wgmma_desc(&{a}[{self.expr(ai)}], 16)), '
                 f'"l"(wgmma_desc(&{b}[{self.expr(bi)}], {16 if k_major else s.b_block}))')
        scales = "1, 1" if k_major else "1, 1, 0, 1"   # (and for 16-bit types: A as is, B transposed)
        return [f'{self.indent * depth}asm volatile("{{ .reg .pred p; setp.ne.b32 p, %{n_acc + 2}, 0; '
                f'wgmma.mma_async.sync.aligned.m64n{s.n}k{DTYPES[s.dtype].mma_k}.f32.{ty}.{ty} {{{outs}}}, '
                f'%{n_acc}, %{n_acc + 1}, p, {scales}; }}" : {accs} : {descs}, "r"(1));']

    def ldmatrix(self, frag: tuple, pad: str) -> list[str]:
        """``ldmatrix`` (``.trans`` for a B fragment, whose pairs run down a column) loading
        registers ``r0...`` from a shared stage; [] where the fragment's 8 rows of 16
        bytes are not each contiguous and aligned. The lanes give the rows' addresses: lane
        l the row ``l % 8`` of matrix ``l / 8``. The instruction reads shared memory, so it
        takes the fence token that each barrier renews: it is never moved above the barrier
        that makes its data visible, yet loads of the same fragment may be merged."""
        loads = [x for reg in frag for x in reg]
        if any(x.bounds or x.clamps or x.buffer not in self.shared or x.buffer != loads[0].buffer for x in loads):
            return []
        e0 = frag[0][0].index
        offsets = [reg[0].index - e0 for reg in frag]
        if any(o.terms for o in offsets):
            return []
        if self.tf32:   # one 32-bit element a register: an A fragment, rows of 4 along t
            trans, row, along, align = False, e0.coef(LANE_GROUP), 1, 4
        elif self.dtype in self.to_float:
            step = frag[0][1].index - e0              # lo to hi: 1 along a row, a row's length down a column
            if step.terms or any(hi.index - lo.index != step for lo, hi in frag):
                return []
            trans = step.const != 1
            row = step.const if trans else e0.coef(LANE_GROUP)   # elements from one row start to the next
            along, align = 2 * step.const, 8
            if trans and e0.coef(LANE_GROUP) != 1:
                return []
        else:
            return []
        if e0.coef(LANE_PLACE) != along or row is None:
            return []
        start = e0.subst(LANE_GROUP, Lin()).subst(LANE_PLACE, Lin())
        if any(c % align for _, c in start.terms) or start.const % align or row % align or \
                any(o.const % align for o in offsets):
            return []
        n = len(frag)
        pick = "0"
        for j in range(n - 1, 0, -1):
            pick = f"(tc_m{' & 1' if n == 2 else ''}) == {j} ? {offsets[j].const} : {pick}"
        addr = f"{self.expr(start)} + tc_r*{row} + ({pick})"
        outs = ", ".join(f"%{i}" for i in range(n))
        regs = ", ".join(f'"=r"(r{i})' for i in range(n))
        shape = f"x{n}{'.trans' if trans else ''}"
        names = [f"r{i}" for i in range(n)]
        lines = [f"{pad}unsigned {', '.join(names)};",
                 f'{pad}asm("ldmatrix.sync.aligned.m8n8.{shape}.shared.b16 {{{outs}}}, [%{n}];" : {regs} : '
                 f'"r"(smem_u32(&{frag[0][0].buffer}[{addr}])), "r"(tc_fence));']
        if self.tf32:   # fp32 bits in: rounded to tf32 as every other operand
            if self.split:
                lines += [f"{pad}const float f{i} = __uint_as_float({r});" for i, r in enumerate(names)]
            lines += [f"{pad}{r} = tf32(__uint_as_float({r}));" for r in names]
        return lines

    def paired(self, lo: Load, hi: Load) -> bool:
        """Two 16-bit elements that are one aligned 32-bit word: the low one at an even
        offset (every coefficient even), the high one next to it, neither guarded."""
        if lo.bounds or hi.bounds or lo.clamps or hi.clamps or lo.buffer != hi.buffer:
            return False
        e = lo.index
        return hi.index == e + 1 and e.const % 2 == 0 and all(c % 2 == 0 for _, c in e.terms)

    # ------------------------------------------------------------ loops
    def for_loop(self, loop: For, depth: int) -> list[str]:
        if loop.kind.startswith("bind:"):
            return self.bound(loop, loop.kind[len("bind:"):], depth)
        if loop.kind == "vectorize":
            return self.vectorized(loop, depth) or self.unrolled(loop, depth)
        return super().for_loop(loop, depth)

    def bound(self, loop: For, axis: str, depth: int) -> list[str]:
        """A bound loop is its index (declared at the top); a guard on it is uniform over a
        block (lowering drops those on thread indices), so every thread reaches the barriers."""
        pad = self.indent * depth
        head = f"{pad}if ({loop.var} < {self.limit(loop)}) {{" if loop.bounds else f"{pad}{{  // {axis}"
        return self.block(head, loop.body, depth)

    def unrolled(self, loop: For, depth: int) -> list[str]:
        """Fully unrolled by nvcc (a constant trip count), a tail guarded inside."""
        pad = self.indent * depth
        head = f"{pad}for (int {loop.var} = 0; {loop.var} < {loop.extent}; ++{loop.var}) {{"
        if loop.bounds:
            inner = self.block(f"{pad}{self.indent}if ({loop.var} < {self.limit(loop)}) {{", loop.body, depth + 1)
            return [f"{pad}#pragma unroll", head, *inner, f"{pad}}}"]
        return [f"{pad}#pragma unroll"] + self.block(head, loop.body, depth)

    def aligned(self, buffer: str, index: Lin, var: str) -> bool:
        """``buffer[index]`` is four consecutive floats from a 16-byte boundary for each
        ``var`` that is a multiple of 4 (tensors and shared buffers are 16-byte aligned)."""
        if buffer in self.registers or buffer in self.narrow or index.coef(var) != 1:
            return False
        return index.const % 4 == 0 and all(c % 4 == 0 for a, c in index.terms if a != var)

    @staticmethod
    def _chunk_aligned(e: Lin, var: str, n: int) -> bool:
        """``e`` moves one element per step of ``var`` from a multiple of ``n``."""
        return e.coef(var) == 1 and e.const % n == 0 and all(c % n == 0 for a, c in e.terms if a != var)

    def chunk_guard(self, load: Load, var: str, n: int) -> str | None:
        """The condition under which a whole chunk of ``n`` elements of ``load`` is inside its
        tensor, where each bound holds for all of the chunk or none of it ("" for no
        bounds); None where a bound cuts a chunk."""
        conds = []
        for e, lim in load.bounds:
            if e.coef(var) != 0 and not (self._chunk_aligned(e, var, n) and lim % n == 0):
                return None
            e0 = self.expr(e.subst(var, Lin()))
            conds.append(f"0 <= {e0} && {e0} < {lim}")
        return " && ".join(conds)

    def vector_copy(self, loop: For, depth: int) -> list[str] | None:
        """A copy of 2, 4 or 8 consecutive 16-bit elements as one 4-, 8- or 16-byte move (zeros
        for a chunk outside the tensor), where both sides are aligned; None otherwise."""
        (store,) = loop.body
        load, var, n = store.value, loop.var, loop.extent
        if not (isinstance(load, Load) and load.buffer in self.narrow and not load.clamps):
            return None
        if n not in (2, 4, 8) or not all(self._chunk_aligned(e, var, n) for e in (store.index, load.index)):
            return None
        return self.chunk_copy(store, load, var, n * 2, depth)

    def chunk_copy(self, store: Store, load: Load, var: str, nbytes: int, depth: int) -> list[str] | None:
        """One aligned chunk of 4, 8 or 16 bytes from ``load`` to ``store`` (``var`` at 0): a
        ``cp.async`` where asked (16 bytes into a swizzled stage), else a move through a
        register."""
        n = nbytes // (2 if store.buffer in self.narrow else 4)
        guard = self.chunk_guard(load, var, n)
        if guard is None:
            return None
        pad = self.indent * depth
        dst, src = (f"{b}[{self.expr(e.subst(var, Lin()))}]" for b, e in ((store.buffer, store.index),
                                                                          (load.buffer, load.index)))
        if store.copy_async and (nbytes == 16 or not self.warpgroup):
            copy, to = f"cp_async{nbytes}", f"&{dst}"
            if self.warpgroup:
                copy, to = "cp_async16s", self.swizzled(store.buffer, store.index.subst(var, Lin()))
            if guard:
                return [f"{pad}{copy}z({to}, ({guard}) ? &{src} : {load.buffer}, {guard});"]
            return [f"{pad}{copy}({to}, &{src});"]
        vec = {16: "uint4", 8: "uint2", 4: "unsigned"}[nbytes]
        if guard:
            zero = {16: "make_uint4(0, 0, 0, 0)", 8: "make_uint2(0, 0)", 4: "0u"}[nbytes]
            return [f"{pad}*({vec}*)&{dst} = ({guard}) ? *(const {vec}*)&{src} : {zero};"]
        return [f"{pad}*({vec}*)&{dst} = *(const {vec}*)&{src};"]

    def vectorized(self, loop: For, depth: int) -> list[str] | None:
        """Chunks of four iterations, moving aligned contiguous loads and stores as float4;
        None when nothing in the loop can be (the caller renders a plain loop)."""
        if loop.bounds or len(loop.body) != 1 or not isinstance(loop.body[0], Store):
            return None
        if loop.body[0].buffer in self.narrow:
            return self.vector_copy(loop, depth)
        if loop.extent % self.lanes:
            return None
        (store,) = loop.body
        var = loop.var
        value = store.value
        if loop.extent == 4 and isinstance(value, Load) and value.buffer not in self.registers and \
                store.buffer not in self.registers and not value.clamps and \
                all(self._chunk_aligned(e, var, 4) for e in (store.index, value.index)):
            copy = self.chunk_copy(store, value, var, 16, depth)   # a float4 chunk, zeros outside the tensor
            if copy:
                return copy
        vec_loads = [l for l in _loads(store.value) if not l.bounds and not l.clamps
                     and self.aligned(l.buffer, l.index, var)]
        vec_store = not store.accumulate and self.aligned(store.buffer, store.index, var)
        if not vec_loads and not vec_store:
            return None
        pad, inner = self.indent * depth, self.indent * (depth + 1)
        names = {id(l): f"{var}_v{k}" for k, l in enumerate(vec_loads)}
        lines = [f"{pad}#pragma unroll",
                 f"{pad}for (int {var} = 0; {var} < {loop.extent}; {var} += {self.lanes}) {{"]
        for l in vec_loads:
            lines.append(f"{inner}const float4 {names[id(l)]} = *(const float4*)&{self.ref(l)};")
        values = [self.value(_shift(store.value, var, k, names)) for k in range(self.lanes)]
        if vec_store and store.copy_async and vec_loads and store.value is vec_loads[0]:   # a plain copy: cp.async
            return lines[:2] + [f"{inner}cp_async16(&{store.buffer}[{self.expr(store.index)}], &{self.ref(store.value)});",
                                f"{pad}}}"]
        if vec_store:
            lines.append(f"{inner}*(float4*)&{store.buffer}[{self.expr(store.index)}] = "
                         f"make_float4({', '.join(values)});")
        else:
            op = "+=" if store.accumulate else "="
            for k, v in enumerate(values):
                index = store.index.subst(var, Lin.var(var) + k)
                lines.append(f"{inner}{store.buffer}[{self.expr(index)}] {op} {v};")
        return lines + [f"{pad}}}"]


def render_cuda(schedule: Schedule, target: Target, name: str) -> Kernel:
    """Check ``schedule`` against the GPU's rules, lower it for a GPU and render CUDA."""
    if not schedule.steps:
        schedule = default_schedule(schedule.op, target)
    check_for_target(schedule, target)
    fn = lower(schedule, name, gpu=True)
    launch = launch_config(schedule.nest)
    renderer = CUDARenderer(target, launch, schedule.op.dtype, bool(schedule.nest.tensorized),
                            schedule.nest.warpgroup)
    source = renderer.render(fn)
    return Kernel(name, source, schedule.op.tensors, launch=launch, dtype=schedule.op.dtype,
                  shared_bytes=renderer.shared_bytes)
