"""Compile kernel sources to shared objects, in parallel, each under a timeout."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..codegen.kernel import Kernel
from ..target import CC, CFLAGS, cpu_target
from .result import BuildResult

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$SCHEDGYM_CACHE/build``, else ``~/.cache/schedgym/build``, else a per-user temp dir."""
    root = os.environ.get("SCHEDGYM_CACHE")
    candidates = [Path(root)] if root else []
    candidates.append(Path.home() / ".cache" / "schedgym")
    candidates.append(Path(tempfile.gettempdir()) / f"schedgym-{os.getuid()}")
    for c in candidates:
        try:
            (c / "build").mkdir(parents=True, exist_ok=True)
            if os.access(c / "build", os.W_OK):
                return c / "build"
        except OSError:
            continue
    raise OSError("no writable directory for compiled kernels; set SCHEDGYM_CACHE")


def _short_compile_error(stderr: str, src: Path) -> str:
    """The first error line, with the cache path shortened; the rest goes to debug log."""
    lines = stderr.replace(str(src), "kernel.c").splitlines()
    errors = [line for line in lines if "error" in line] or lines or ["compiler failed"]
    return "compile error: " + errors[0].strip()[:300]


class Builder:
    """Compiles kernel sources to shared objects, in parallel, each under a timeout.

    Objects are cached on disk by source digest and toolchain (compiler, flags and
    CPU, because of ``-march=native``), so the same source is compiled only once.
    """

    def __init__(self, workers: int | None = None, timeout_s: float = 60.0,
                 cache_dir: str | os.PathLike | None = None, cc: str = CC,
                 cflags: tuple[str, ...] = CFLAGS):
        self.workers = workers or len(os.sched_getaffinity(0)) or 1
        self.timeout_s = timeout_s
        self.cache_dir = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).resolve()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cc, self.cflags = cc, tuple(cflags)
        t = cpu_target()
        toolchain = json.dumps([cc, t.compiler, self.cflags, t.device])
        self._toolchain = hashlib.sha256(toolchain.encode()).hexdigest()[:10]
        self._lock = threading.Lock()
        self.compiles = 0             # compiler invocations so far (cache hits excluded)

    def path_for(self, kernel: Kernel) -> Path:
        return self.cache_dir / f"{kernel.digest}-{self._toolchain}.so"

    def build(self, kernels: list[Kernel]) -> list[BuildResult]:
        """One BuildResult per kernel, in order; equal sources are compiled once."""
        unique = {k.digest: k for k in kernels}
        if len(unique) <= 1 or self.workers == 1:
            done = {d: self._build_one(k) for d, k in unique.items()}
        else:
            with ThreadPoolExecutor(min(self.workers, len(unique))) as pool:
                done = dict(zip(unique, pool.map(self._build_one, unique.values())))
        return [done[k.digest] for k in kernels]

    def _build_one(self, kernel: Kernel) -> BuildResult:
        if kernel.is_cuda:
            return self._store_cuda(kernel)
        so = self.path_for(kernel)
        if so.exists():
            return BuildResult(str(so), None, 0.0, cached=True)
        t0 = time.perf_counter()
        tag = f"{os.getpid()}-{threading.get_ident()}"
        src = so.with_suffix(".c")
        tmp_src = so.with_name(f"{so.stem}.{tag}.tmp.c")
        tmp_so = so.with_name(f"{so.stem}.{tag}.tmp.so")
        with self._lock:
            self.compiles += 1
        try:
            tmp_src.write_text(kernel.source)
            os.replace(tmp_src, src)  # kept beside the object, for reading
            cmd = [self.cc, *self.cflags, str(src), "-o", str(tmp_so)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                return BuildResult(None, f"compile timeout after {self.timeout_s:g}s",
                                   time.perf_counter() - t0)
            except OSError as e:
                return BuildResult(None, f"compile error: cannot run {self.cc}: {e}",
                                   time.perf_counter() - t0)
            if proc.returncode != 0:
                logger.debug("compile of %s failed:\n%s", kernel.name, proc.stderr)
                return BuildResult(None, _short_compile_error(proc.stderr, src),
                                   time.perf_counter() - t0)
            os.replace(tmp_so, so)  # atomic: a concurrent reader never sees half a file
            return BuildResult(str(so), None, time.perf_counter() - t0)
        finally:
            for p in (tmp_src, tmp_so):
                p.unlink(missing_ok=True)


    def _store_cuda(self, kernel: Kernel) -> BuildResult:
        """CUDA source is compiled by NVRTC where it runs; here it is only written down."""
        cu = self.cache_dir / f"{kernel.digest}.cu"
        if cu.exists():
            return BuildResult(str(cu), None, 0.0, cached=True)
        tmp = cu.with_name(f"{cu.stem}.{os.getpid()}-{threading.get_ident()}.tmp.cu")
        try:
            tmp.write_text(kernel.source)
            os.replace(tmp, cu)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            return BuildResult(None, f"cannot write kernel source: {e}", 0.0)
        return BuildResult(str(cu), None, 0.0)
