"""Time the dataset quality report and tabulate the TQ-SACo plane (results go to benchmarks/quality.md).

    python benchmarks/bench_quality.py hopper-random hopper-medium hopper-medium-replay hopper-expert \
        hopper-medium-expert [--reference hopper-medium-replay] [--json out.json]

Each dataset gets the full report (TQ, all SACo variants, coverage, diagnostics, BC models, HTML render)
with a fresh reference object (no cache carried between datasets), timed as wall-clock and as process
CPU seconds (all threads). On a shared machine the wall time depends on the load; the 1-minute load
average is printed beside it, and CPU seconds / cores is what an idle machine's wall time approaches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from offlab.data import metrics, store
    from offlab.data import report as qr

    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="+")
    ap.add_argument("--reference", default=None, help="reference dataset (default: as `offlab data report`)")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    rows = []
    for name in args.names:
        ds = store.load_dataset(name)  # loading is not timed: it is the store's benchmark
        ref_ds = store.load_dataset(args.reference) if args.reference else None
        w0, c0 = time.perf_counter(), time.process_time()
        ref = metrics.reference_from_dataset(ref_ds) if ref_ds is not None else qr.resolve_reference(ds)
        rep = qr.build_report(ds, ref)
        html = qr.render_html(rep, [qr.plane_point(name, rep.summary())])
        with tempfile.TemporaryDirectory() as tmp:
            qr.write_text_atomic(Path(tmp) / "r.html", html)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        s = rep.summary()
        row = {**qr.plane_point(name, s), "n_transitions": len(ds), "p": s["space"]["p"], "wall_s": wall,
               "cpu_s": cpu, "load_1min": os.getloadavg()[0], "timing": s["timing"],
               "saco_paper_occupancy": s["saco_paper"]["occupancy"], "entropy_proxy": s["behaviour"].get("entropy_proxy")}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("name", "n_transitions", "wall_s", "cpu_s", "load_1min")}), flush=True)

    print("\n| dataset | N | TQ | SACo paper (occupancy) | SACo-grid | SACo-H/dim | Coverage@5 | out-of-support "
          "| p | report wall s (load) | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sat = " **sat.**" if r["saco_paper_saturated"] else ""
        print(f"| {r['name']} | {r['n_transitions']:,} | {r['tq']:.3f} | {r['saco_paper']:.3f} "
              f"({r['saco_paper_occupancy']:.2f}){sat} | {r['saco_grid']:.3f} ± {r['saco_grid_std']:.3f} | "
              f"{r['saco_h_pd']:.3f} ± {r['saco_h_pd_std']:.3f} | {r['coverage']:.3f} ± {r['coverage_std']:.3f} | "
              f"{r['out_of_support']:.3f} | {r['p']} | {r['wall_s']:.1f} ({r['load_1min']:.1f}) | {r['cpu_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
