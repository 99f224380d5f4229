"""Compare runs: a curve against hardware measurements, one line per run.

Tune runs are compared by their best GFLOPS, train runs by their mean (over the
shapes trained on) best speedup over the naive kernel: each logs its curve in
progress.jsonl. Writes a PNG plot and a markdown table (the final value,
measurements to reach 90% of that run's best, wall time) and prints the table.

Examples:
  python -m experiments compare runs/matmul-cpu-ppo-0-* runs/matmul-cpu-random-0-* --out compare
  python -m experiments compare runs/matmul-cpu-ppo-0-*  # train runs (--resume keeps one curve)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import field
from .runs import read_progress


@dataclass
class Config:
    run_dirs: list = field(help="run directories written by tune, or by train", nargs="+", metavar="RUN_DIR",
                           positional=True)
    out: str = field("compare", help="output prefix: writes OUT.png and OUT.md")
    json: bool = field(False, help="print one JSON object as the last line")


# the curves runs log, by the command that wrote them: (progress tag, what it is)
CURVES = (("search/best_gflops", "best GFLOPS"),                           # tune
          ("search/mean_best_speedup", "mean best speedup over naive"))     # train


def measurements_to_reach(points: list[dict], fraction: float, tag: str = "search/best_gflops") -> int | None:
    """Measurements after which the curve ``tag`` is within ``fraction`` of the run's best."""
    best = max((p[tag] for p in points), default=0.0)
    for p in points:
        if best > 0 and p[tag] >= fraction * best:
            return p["measurements"]
    return None


def _curve(runs: dict[Path, list[dict]]) -> tuple[str, str]:
    """The curve every run logs."""
    for tag, name in CURVES:
        if all(any(tag in p for p in points) for points in runs.values()):
            return tag, name
    raise ValueError(f"{', '.join(map(str, runs))} log no common curve ({', '.join(t for t, _ in CURVES)}): "
                     "compare tune runs with tune runs, train runs with train runs")


def _label(run_dir: Path) -> str:
    summary = run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        return f"{s['agent']} ({s['op']} {s['shape']})"
    config = run_dir / "config.json"
    if config.is_file():   # a train run
        c = json.loads(config.read_text())
        if "shapes" in c and "timesteps" in c:
            return f"{c.get('agent', 'ppo')} train ({c.get('op')} {c['shapes']} shapes, seed {c.get('seed')})"
    return run_dir.name


def run(cfg: Config) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for d in map(Path, cfg.run_dirs):
        runs[d] = read_progress(d)
        if not runs[d]:
            raise ValueError(f"{d} has no measurements yet")
    tag, name = _curve(runs)
    rows = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d, points in runs.items():
        points = [p for p in points if tag in p]
        label = _label(d)
        ax.step([p["measurements"] for p in points], [p[tag] for p in points], where="post", label=label)
        rows.append({"run": str(d), "label": label, "curve": tag, "best": points[-1][tag],
                     "measurements": points[-1]["measurements"],
                     "to_90pct": measurements_to_reach(points, 0.9, tag),
                     "wall_s": points[-1].get("search/wall_time_s")})   # train does not log it
        if tag == "search/best_gflops":
            rows[-1]["best_gflops"] = rows[-1]["best"]
    ax.set_xlabel("hardware measurements")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png, md = Path(f"{cfg.out}.png"), Path(f"{cfg.out}.md")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    table = [f"| run | {name} | measurements | to 90% of best | wall s |", "|---|---:|---:|---:|---:|"]
    table += [f"| {r['label']} | {r['best']:.1f} | {r['measurements']} | {r['to_90pct']} | "
              f"{'-' if r['wall_s'] is None else format(r['wall_s'], '.1f')} |" for r in rows]
    md.write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"wrote {png} and {md}")
    return {"png": str(png), "md": str(md), "runs": rows}
