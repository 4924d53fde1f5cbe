"""What report.html costs an evaluation.

1. `python eval.py` (the bundled demo, one step, its feature cache warm) with the report (default) and with
   `report=false`, alternately, `--rounds` times: the median of the per-round wall-time ratios (target <= 1.05).
2. The report of a 100k-pair evaluation: `runs/report.write_eval_report` (gallery selection over all rows, the why
   pass and the drawing of the shown cards only, the page) on 100,000 prediction rows over the bundled val features
   and images with the demo model; best of `--repeats` (target <= 10 s). Its baseline in the same run: the time
   `write_predictions` takes to write the same rows (the result file every evaluation writes anyway).

    python bench/report_cost.py [--rounds 3] [--pairs 100000] [--skip-eval]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


REPORT_TIME = re.compile(r"\(written in ([0-9.]+) s\)")


def run_eval(out: Path, *overrides: str) -> tuple[float, float, float | None]:
    """(wall seconds, CPU seconds of the child, the report's own seconds as eval.py prints them, or None)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "eval.py", "--out", str(out), *overrides], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    found = REPORT_TIME.search(proc.stdout)
    return wall, cpu, float(found.group(1)) if found else None


def bench_eval(rounds: int, work: Path) -> None:
    """Side by side, alternating: wall-time ratio, CPU-time ratio (less sensitive to other jobs on a shared
    machine), and the report's own time over the report=false run's wall time."""
    on, off = work / "with_report", work / "without_report"
    run_eval(on)  # warm-up: fills each folder's one-step feature cache
    run_eval(off, "report=false")
    wall, cpu, own = [], [], []
    for k in range(rounds):
        pair = [("on", on, ()), ("off", off, ("report=false",))]
        got = {}
        for label, out, extra in (pair if k % 2 == 0 else pair[::-1]):
            got[label] = run_eval(out, *extra)
        wall.append(got["on"][0] / got["off"][0])
        cpu.append(got["on"][1] / got["off"][1])
        own.append(got["on"][2] / got["off"][0])
        print(f"round {k + 1}: with report {got['on'][0]:.2f} s wall / {got['on'][1]:.2f} s CPU (report "
              f"{got['on'][2]:.2f} s), report=false {got['off'][0]:.2f} s / {got['off'][1]:.2f} s: wall ratio "
              f"{wall[-1]:.3f}, CPU ratio {cpu[-1]:.3f}, report / eval {own[-1]:.3f}", flush=True)
    print(f"python eval.py, median of {rounds} rounds: wall ratio {statistics.median(wall):.3f}, CPU ratio "
          f"{statistics.median(cpu):.3f}, the report's own time {100 * statistics.median(own):.1f}% of the "
          f"report=false run (target <= 5%)")


def bench_large(num_pairs: int, repeats: int, work: Path) -> None:
    import numpy as np

    from lxmert_pl.features.sources import open_feature_source
    from lxmert_pl.model.loading import load_lxmert
    from lxmert_pl.registry import resolve_checkpoint
    from lxmert_pl.runs.config import compose
    from lxmert_pl.runs.outputs import write_predictions
    from lxmert_pl.runs.report import write_eval_report

    sample = REPO_ROOT / "data" / "sample"
    base = json.loads((sample / "val_pairs.json").read_text())
    rng = np.random.default_rng(0)
    scores = rng.random(num_pairs)
    rows = []
    for k in range(num_pairs):
        pair = base[k % len(base)]
        rows.append({"question_id": k, "img_id": pair["img_id"], "sent": pair["sent"], "score": float(scores[k]),
                     "answer": "True" if scores[k] > 0.5 else "False", "ground": pair["ground"]})
    tsv = sample / "features" / "val_obj.tsv"
    cfg = compose("eval", flags={"data.features": [str(tsv)], "data.pairs": str(sample / "val_pairs.json"),
                                 "data.images": str(sample / "images" / "val"), "data.source": "features"})
    resolved = resolve_checkpoint(str(cfg.ckpt))
    model, _ = load_lxmert(resolved.path)
    model.eval()
    source = open_feature_source([str(tsv)])
    report_times, write_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        write_predictions(work, rows)
        write_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        write_eval_report(work, cfg, rows=rows, metrics={"accuracy": 0.5}, plots=[], threshold=0.5,
                          resolved=resolved, source=source, model=model, name="bench")
        report_times.append(time.perf_counter() - start)
    size = (work / "report.html").stat().st_size / 1e6
    print(f"{num_pairs} pairs: report {min(report_times):.2f} s (target <= 10 s), writing predictions.json/csv "
          f"{min(write_times):.2f} s (ratio {min(report_times) / min(write_times):.2f}); page {size:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating eval rounds")
    parser.add_argument("--pairs", type=int, default=100_000, help="rows of the large report")
    parser.add_argument("--repeats", type=int, default=2, help="large report: best of this many")
    parser.add_argument("--skip-eval", action="store_true", help="only the large report")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="report_cost_") as tmp:
        work = Path(tmp)
        if not args.skip_eval:
            bench_eval(args.rounds, work)
        bench_large(args.pairs, args.repeats, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
