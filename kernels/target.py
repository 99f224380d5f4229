"""The machine a kernel is generated for and measured on."""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

CC = os.environ.get("SCHEDGYM_CC", "gcc")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")  # GNU C: fp-contract=fast gives FMAs


@dataclass(frozen=True)
class Target:
    """What code generation and the measurement cache need to know about a device."""

    kind: str            # "cpu" or "cuda"
    device: str          # CPU model name, or GPU name
    cores: int           # CPU cores, or GPU multiprocessors
    vector_lanes: int    # fp32 lanes of the widest SIMD register (a warp on a GPU)
    compiler: str        # compiler version line
    # GPU limits (unset on a CPU): what a kernel's launch, registers and shared memory may use
    arch: str = ""                   # e.g. "sm_90", for NVRTC/nvcc
    max_threads_per_block: int = 0
    shared_bytes_per_block: int = 0  # shared memory a block may opt in to (dynamic)
    sm_count: int = 0
    max_block: tuple[int, ...] = ()  # threadIdx extents (x, y, z)
    max_grid: tuple[int, ...] = ()   # blockIdx extents (x, y, z)
    tile_bytes: int = 0              # a thread's accumulator tile: beyond registers it spills
    # What the observation describes, so one policy can serve machines it was not trained on
    # (0: unknown, or absent on this kind of device; records and logs never hold them)
    l1_bytes: int = 0                # data cache per level, as one core sees it (CPU)
    l2_bytes: int = 0                # (a GPU's L2 too)
    l3_bytes: int = 0
    registers_per_block: int = 0     # 32-bit registers (GPU)
    registers_per_sm: int = 0

    @property
    def sm80(self) -> bool:
        """Whether a GPU has sm_80's instructions (``cp.async``, ``mma.sync`` on tf32, bf16 and
        fp16), as every one since Ampere does; an unknown arch is taken to."""
        return not self.arch or int(self.arch[3:]) >= 80

    @property
    def peak_gflops(self) -> float:
        """An upper bound no kernel can beat: every lane doing two FMAs (four flops) a cycle
        at 6 GHz on a CPU; 8192 flops a cycle per multiprocessor at 3 GHz on a GPU (above
        Hopper's dense tensor cores). A timing above it is a measurement error."""
        if self.kind == "cuda":
            return self.sm_count * 8192 * 3.0
        return self.cores * self.vector_lanes * 4 * 6.0

    def to_json(self) -> dict:
        """The fields, leaving out GPU limits that are unset, so a CPU target reads as before."""
        d = asdict(self)
        for f in fields(self):
            if f.default is not MISSING and d[f.name] == f.default:
                del d[f.name]
        return d


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


CACHE_FALLBACK = (32 << 10, 1 << 20, 8 << 20)  # L1d, L2, L3 of a common x86 server core


def _cpu_caches(root: str = "/sys/devices/system/cpu/cpu0/cache") -> tuple[int, int, int]:
    """Bytes of the L1 data, L2 and L3 caches cpu0 sees, from sysfs. Where sysfs says
    nothing (another OS, a sandbox), ``CACHE_FALLBACK``: the features then describe a
    typical machine rather than none; a level sysfs lists no cache for stays 0."""
    sizes: dict[int, int] = {}
    for index in sorted(Path(root).glob("index[0-9]*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match and kind in ("Data", "Unified"):
            sizes[level] = int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2]]
    if not sizes:
        return CACHE_FALLBACK
    return sizes.get(1, 0), sizes.get(2, 0), sizes.get(3, 0)


def _compiler_version() -> str:
    try:
        out = subprocess.run([CC, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


@functools.lru_cache(maxsize=None)
def cpu_target() -> Target:
    flags = _cpu_flags()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    l1, l2, l3 = _cpu_caches()
    return Target("cpu", re.sub(r"\s+", " ", _cpu_model()), cores or 1, lanes, _compiler_version(),
                  l1_bytes=l1, l2_bytes=l2, l3_bytes=l3)


MAX_GFLOPS = 1e7   # beyond any single device (tensor cores included): a bound for unknown hardware


class NoCudaDevice(OSError):
    """No usable CUDA GPU here (an OSError, so the command line reports it in one line)."""


CUDA_SHARED_BYTES = 48 << 10  # shared memory per block that needs no opt-in, on every GPU
# What a block may opt in to (sharedMemPerBlockOptin), per architecture: A100, consumer
# Ampere/Ada, Hopper. Kernels use dynamic shared memory, and launch with the attribute set.
CUDA_SHARED_OPTIN = {"sm_80": 163 << 10, "sm_86": 99 << 10, "sm_87": 163 << 10, "sm_89": 99 << 10,
                     "sm_90": 227 << 10}
# Limits every CUDA device since compute capability 3.0 shares
CUDA_LIMITS = dict(max_block=(1024, 1024, 64), max_grid=(2 ** 31 - 1, 65535, 65535), tile_bytes=2048)


def cuda_target_for_compile(arch: str = "sm_90", device: str | None = None, sm_count: int = 132,
                            l2_bytes: int = 60 << 20) -> Target:
    """A CUDA target with the usual limits, for generating and nvcc-compiling code where no
    GPU is present (tests, CI, imitation, which measures nothing); by default an H200's
    description. Its device name says so, so it never shares a cache entry with a measured
    GPU."""
    return Target("cuda", device or f"compile-only {arch}", sm_count, 32, "nvcc", arch=arch,
                  max_threads_per_block=1024, shared_bytes_per_block=CUDA_SHARED_OPTIN.get(arch, CUDA_SHARED_BYTES),
                  sm_count=sm_count, l2_bytes=l2_bytes, registers_per_block=65536, registers_per_sm=65536,
                  **CUDA_LIMITS)


@functools.lru_cache(maxsize=None)
def cuda_target(device_id: int = 0) -> Target:
    """The GPU's name and limits, read through CuPy; ``NoCudaDevice`` without CuPy or a GPU."""
    try:
        import cupy  # noqa: F401  (optional: only GPU machines have it)
    except ImportError as e:
        raise NoCudaDevice(f"no CUDA GPU: CuPy is not installed ({e})") from None
    try:
        from cupy.cuda import nvrtc, runtime
        if runtime.getDeviceCount() <= device_id:
            raise NoCudaDevice(f"no CUDA GPU: device {device_id} does not exist")
        p = runtime.getDeviceProperties(device_id)
        major, minor = nvrtc.getVersion()
    except NoCudaDevice:
        raise
    except Exception as e:  # CUDARuntimeError without a driver or device
        raise NoCudaDevice(f"no CUDA GPU: {type(e).__name__}: {e}") from None
    name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
    return Target("cuda", name, int(p["multiProcessorCount"]), int(p["warpSize"]),
                  f"NVRTC {major}.{minor}", arch=f"sm_{p['major']}{p['minor']}",
                  max_threads_per_block=int(p["maxThreadsPerBlock"]),
                  shared_bytes_per_block=int(p.get("sharedMemPerBlockOptin", 0) or p["sharedMemPerBlock"]),
                  sm_count=int(p["multiProcessorCount"]), l2_bytes=int(p.get("l2CacheSize", 0)),
                  registers_per_block=int(p.get("regsPerBlock", 0)),
                  registers_per_sm=int(p.get("regsPerMultiprocessor", 0)), **CUDA_LIMITS)


def cuda_devices() -> int:
    """How many CUDA GPUs this process sees (CUDA_VISIBLE_DEVICES applies); ``NoCudaDevice``
    without CuPy, a driver or a GPU."""
    try:
        import cupy  # noqa: F401  (optional: only GPU machines have it)
    except ImportError as e:
        raise NoCudaDevice(f"no CUDA GPU: CuPy is not installed ({e})") from None
    try:
        from cupy.cuda import runtime
        n = int(runtime.getDeviceCount())
    except Exception as e:  # CUDARuntimeError without a driver or device
        raise NoCudaDevice(f"no CUDA GPU: {type(e).__name__}: {e}") from None
    if n < 1:
        raise NoCudaDevice("no CUDA GPU: CUDA sees no device")
    return n


def get_target(kind: str) -> Target:
    if kind == "cpu":
        return cpu_target()
    if kind == "cuda":
        return cuda_target()
    raise ValueError(f"unknown target {kind!r}; known: cpu, cuda")


def target_or_description(kind: str) -> Target:
    """This machine's target; for cuda without a GPU, an H200's description
    (``cuda_target_for_compile``), for work that measures nothing (rendering, ranking)."""
    try:
        return get_target(kind)
    except NoCudaDevice:
        return cuda_target_for_compile()
