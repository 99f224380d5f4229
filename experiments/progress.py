"""Progress on long work: a bar on a terminal, a short line every few seconds elsewhere.

tqdm hides its bar when stderr is not a terminal (CI, pipes, ``nohup``), which left
a search silent for its whole length; then a line such as
``tune matmul 1024x1024x1024: 12/64 meas, best_gflops=133.0, 9 s`` is printed instead.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "meas", initial: int = 0,
                 every_s: float = 5.0, file: TextIO | None = None):
        from tqdm import tqdm

        self.file = file or sys.stderr
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n, self.postfix = initial, ""
        self.t0 = self.last = time.monotonic()
        tty = hasattr(self.file, "isatty") and self.file.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.file) if tty else None

    def update(self, n: int = 1, **postfix: str) -> None:
        self.n += n
        if postfix:
            self.postfix = ", ".join(f"{k}={v}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix)
        elif time.monotonic() - self.last >= self.every_s:
            self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{extra}, {self.last - self.t0:.0f} s",
              file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._line()
