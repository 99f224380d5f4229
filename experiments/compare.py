"""Compare tuning runs: best GFLOPS against hardware measurements, one line per run.

Writes a PNG plot and a markdown table (best GFLOPS, measurements to reach 90% of
that run's best, wall time) and prints the table.

Example:
  python -m experiments compare runs/matmul-cpu-ppo-0-* runs/matmul-cpu-random-0-* --out compare
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import field
from .runs import read_progress


@dataclass
class Config:
    run_dirs: list = field(help="run directories written by tune", nargs="+", metavar="RUN_DIR",
                           positional=True)
    out: str = field("compare", help="output prefix: writes OUT.png and OUT.md")
    json: bool = field(False, help="print one JSON object as the last line")


def measurements_to_reach(points: list[dict], fraction: float) -> int | None:
    """Measurements after which the best GFLOPS is within ``fraction`` of the run's final best."""
    best = max((p["search/best_gflops"] for p in points), default=0.0)
    for p in points:
        if best > 0 and p["search/best_gflops"] >= fraction * best:
            return p["measurements"]
    return None


def _label(run_dir: Path) -> str:
    summary = run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        return f"{s['agent']} ({s['op']} {s['shape']})"
    return run_dir.name


def run(cfg: Config) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d in map(Path, cfg.run_dirs):
        points = read_progress(d)
        if not points:
            raise ValueError(f"{d} has no measurements yet")
        label = _label(d)
        ax.step([p["measurements"] for p in points], [p["search/best_gflops"] for p in points],
                where="post", label=label)
        rows.append({"run": str(d), "label": label, "best_gflops": points[-1]["search/best_gflops"],
                     "measurements": points[-1]["measurements"],
                     "to_90pct": measurements_to_reach(points, 0.9),
                     "wall_s": points[-1].get("search/wall_time_s", 0.0)})
    ax.set_xlabel("hardware measurements")
    ax.set_ylabel("best GFLOPS")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png, md = Path(f"{cfg.out}.png"), Path(f"{cfg.out}.md")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    table = ["| run | best GFLOPS | measurements | to 90% of best | wall s |", "|---|---:|---:|---:|---:|"]
    table += [f"| {r['label']} | {r['best_gflops']:.1f} | {r['measurements']} | {r['to_90pct']} | "
              f"{r['wall_s']:.1f} |" for r in rows]
    md.write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"wrote {png} and {md}")
    return {"png": str(png), "md": str(md), "runs": rows}
