"""Compile kernel sources to shared objects, in parallel, each under a timeout."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
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


class CacheDirError(OSError):
    """The build cache's directory is not safe to load code from."""


def private_dir(path: Path) -> Path:
    """``path``, created if missing, checked to be a real directory that this user owns and
    no one else can write: objects loaded from it run as the user."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"{path} is not a directory (a link?)")
    if st.st_uid != os.getuid():
        raise CacheDirError(f"{path} belongs to another user (uid {st.st_uid})")
    if st.st_mode & 0o022:
        raise CacheDirError(f"{path} can be written by others (mode {stat.S_IMODE(st.st_mode):o})")
    return path


def default_cache_dir() -> Path:
    """``$SCHEDGYM_CACHE/build``, else ``~/.cache/schedgym/build``, else a per-user temp dir;
    each must be private (:func:`private_dir`), the one the user set above all."""
    root = os.environ.get("SCHEDGYM_CACHE")
    if root:
        return private_dir(Path(root) / "build")
    reasons = []
    for c in (Path.home() / ".cache" / "schedgym", Path(tempfile.gettempdir()) / f"schedgym-{os.getuid()}"):
        try:
            return private_dir(private_dir(c) / "build")
        except OSError as e:
            reasons.append(str(e))
    raise CacheDirError("no private directory for compiled kernels (" + "; ".join(reasons)
                        + "); set SCHEDGYM_CACHE to one you own")


class ObjectCache:
    """Files in a private directory, each used only while its SHA-256 matches the digest
    recorded beside it when it was stored (a file replaced since is dropped and remade)."""

    def __init__(self, directory: Path):
        self.dir = private_dir(directory)

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(path.name + ".sha256")

    def get(self, name: str) -> Path | None:
        """The stored file, if present and unchanged; None otherwise."""
        path = self.dir / name
        try:
            recorded = self._sidecar(path).read_text().strip()
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != recorded:
            logger.warning("cached %s does not match its recorded digest; it is built again", path)
            path.unlink(missing_ok=True)
            return None
        return path

    def put(self, name: str, data: bytes) -> Path:
        """Store ``data`` as ``name`` atomically, digest first: a reader in between sees a
        mismatch and rebuilds, never a half-written object taken as good."""
        path = self.dir / name
        tag = f"{os.getpid()}-{threading.get_ident()}"
        for target, content in ((self._sidecar(path), hashlib.sha256(data).hexdigest().encode()),
                                (path, data)):
            tmp = target.with_name(f"{target.name}.{tag}.tmp")
            try:
                tmp.write_bytes(content)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        return path


def _short_compile_error(stderr: str, src: Path) -> str:
    """The first error line, with the cache path shortened; the rest goes to debug log."""
    lines = stderr.replace(str(src), "kernel.c").splitlines()
    errors = [line for line in lines if "error" in line] or lines or ["compiler failed"]
    return "compile error: " + errors[0].strip()[:300]


class Builder:
    """Compiles kernel sources to shared objects, in parallel, each under a timeout.

    Objects are cached on disk (an :class:`ObjectCache`) by source digest and toolchain
    (compiler, flags and CPU, because of ``-march=native``), so the same source is
    compiled only once.
    """

    def __init__(self, workers: int | None = None, timeout_s: float = 60.0,
                 cache_dir: str | os.PathLike | None = None, cc: str = CC,
                 cflags: tuple[str, ...] = CFLAGS):
        self.workers = workers or len(os.sched_getaffinity(0)) or 1
        self.timeout_s = timeout_s
        self.cache = ObjectCache(Path(cache_dir).resolve() if cache_dir is not None else default_cache_dir())
        self.cache_dir = self.cache.dir
        self.cc, self.cflags = cc, tuple(cflags)
        t = cpu_target()
        toolchain = json.dumps([cc, t.compiler, self.cflags, t.device])
        self._toolchain = hashlib.sha256(toolchain.encode()).hexdigest()[:10]
        self._lock = threading.Lock()
        self.compiles = 0             # compiler invocations so far (cache hits excluded)

    def object_name(self, kernel: Kernel) -> str:
        """The cache entry of ``kernel``: CUDA source as is, C compiled by this toolchain."""
        return f"{kernel.digest}.cu" if kernel.is_cuda else f"{kernel.digest}-{self._toolchain}.so"

    def path_for(self, kernel: Kernel) -> Path:
        return self.cache_dir / self.object_name(kernel)

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
        name = self.object_name(kernel)
        hit = self.cache.get(name)
        if hit is not None:
            return BuildResult(str(hit), None, 0.0, cached=True)
        if kernel.is_cuda:  # compiled by NVRTC where it runs; here it is only written down
            try:
                return BuildResult(str(self.cache.put(name, kernel.source.encode())), None, 0.0)
            except OSError as e:
                return BuildResult(None, f"cannot write kernel source: {e}", 0.0)
        t0 = time.perf_counter()
        src = self.cache_dir / (Path(name).stem + ".c")   # kept beside the object, for reading
        tmp_so = self.cache_dir / f"{Path(name).stem}.{os.getpid()}-{threading.get_ident()}.tmp.so"
        with self._lock:
            self.compiles += 1
        try:
            src.write_text(kernel.source)
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
            path = self.cache.put(name, tmp_so.read_bytes())
            return BuildResult(str(path), None, time.perf_counter() - t0)
        finally:
            tmp_so.unlink(missing_ok=True)
