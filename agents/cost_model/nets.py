"""The networks over the feature vector: ``set`` (per loop row, pooled) and ``mlp`` (flat)."""

from __future__ import annotations

import torch
from torch import nn

from envs.actions import MAX_LOOPS
from envs.features import GLOBAL_WIDTH, LOOP, LOOP_WIDTH, ROWS, SIZE

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
    """Per-loop MLP, masked sum and max pooling, globals, MLP head."""

    def __init__(self, hidden: int):
        super().__init__()
        self.rows = nn.Sequential(nn.Linear(LOOP_WIDTH + 2, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(2 * hidden + GLOBAL_WIDTH, 2 * hidden), nn.ReLU(),
                                  nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        rows = loop_rows(x)
        mask = present.unsqueeze(-1)                                       # b, L, 1
        depth = torch.arange(MAX_LOOPS, dtype=x.dtype, device=x.device).expand(b, -1)
        n = present.sum(1, keepdim=True)
        pos = torch.stack([depth / MAX_LOOPS, (n - 1 - depth) / MAX_LOOPS], -1) * mask
        h = self.rows(torch.cat([rows, pos], -1)) * mask
        pooled_max = h.masked_fill(mask == 0, -1e9).max(1).values
        pooled = torch.cat([h.sum(1) / MAX_LOOPS, pooled_max, x[:, ROWS:]], -1)
        return self.head(pooled).squeeze(-1)


class FlatNet(nn.Module):
    """An MLP over the flat feature vector."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(SIZE, 4 * hidden), nn.ReLU(), nn.Linear(4 * hidden, 2 * hidden),
                                 nn.ReLU(), nn.Linear(2 * hidden, 1))

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


ARCHS = {"set": SetNet, "mlp": FlatNet}
