"""The networks over the feature vector: ``set`` (per loop row, pooled) and ``mlp`` (flat)."""

from __future__ import annotations

import torch
from torch import nn

from envs.actions import MAX_LOOPS
from envs.features import GLOBAL_WIDTH, LOOP, LOOP_WIDTH, ROWS, SIZE

from .features import NEST_GLOBAL_WIDTH, NEST_LOOP_WIDTH, NEST_SIZE

PRESENT = LOOP["present"].start        # the column that says a loop row holds a loop


class one_thread:
    """Run torch on one thread: these nets are tiny, and on a busy 2-core machine a
    second thread made a training step ~10x slower, not faster."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def loop_rows(x):
    """The loop rows of feature vectors ``x`` (n, SIZE): (n, MAX_LOOPS, LOOP_WIDTH)."""
    return x[:, :ROWS].reshape(len(x), MAX_LOOPS, LOOP_WIDTH)


def present_rows(x):
    """Which loop rows of ``x`` hold a loop: (n, MAX_LOOPS) booleans."""
    return loop_rows(x)[:, :, PRESENT] > 0.5


class SetNet(nn.Module):
    """Per-loop MLP, masked sum and max pooling, globals, MLP head; with ``nest``, the
    cost model's own columns (``features``) join each loop's row and the globals."""

    def __init__(self, hidden: int, nest: bool = False):
        super().__init__()
        self.nest = nest
        row_width = LOOP_WIDTH + 2 + (NEST_LOOP_WIDTH if nest else 0)
        global_width = GLOBAL_WIDTH + (NEST_GLOBAL_WIDTH if nest else 0)
        self.rows = nn.Sequential(nn.Linear(row_width, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(2 * hidden + global_width, 2 * hidden), nn.ReLU(),
                                  nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        rows, glob = loop_rows(x), x[:, ROWS:SIZE]
        if self.nest:
            extra = SIZE + MAX_LOOPS * NEST_LOOP_WIDTH
            rows = torch.cat([rows, x[:, SIZE:extra].reshape(b, MAX_LOOPS, NEST_LOOP_WIDTH)], -1)
            glob = torch.cat([glob, x[:, extra:]], -1)
        mask = present.unsqueeze(-1)                                       # b, L, 1
        depth = torch.arange(MAX_LOOPS, dtype=x.dtype, device=x.device).expand(b, -1)
        n = present.sum(1, keepdim=True)
        pos = torch.stack([depth / MAX_LOOPS, (n - 1 - depth) / MAX_LOOPS], -1) * mask
        h = self.rows(torch.cat([rows, pos], -1)) * mask
        pooled_max = h.masked_fill(mask == 0, -1e9).max(1).values
        pooled = torch.cat([h.sum(1) / MAX_LOOPS, pooled_max, glob], -1)
        return self.head(pooled).squeeze(-1)


class FlatNet(nn.Module):
    """An MLP over the flat feature vector."""

    def __init__(self, hidden: int, nest: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(SIZE + (NEST_SIZE if nest else 0), 4 * hidden), nn.ReLU(), nn.Linear(4 * hidden, 2 * hidden),
                                 nn.ReLU(), nn.Linear(2 * hidden, 1))

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


ARCHS = {"set": SetNet, "mlp": FlatNet}


class Ensemble(nn.Module):
    """``size`` nets of one architecture from different initial weights, trained side by
    side on the same batches, each on its own loss: their mean ranks unseen shapes better
    than any one of them. ``forward`` gives every member's prediction, (size, batch)."""

    def __init__(self, arch: str, hidden: int, nest: bool, size: int):
        super().__init__()
        self.members = nn.ModuleList(ARCHS[arch](hidden, nest) for _ in range(size))

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x, present) for m in self.members])
