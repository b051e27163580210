"""Run every benchmark, each in its own process, print the table and write bench/results.json.

    python -m bench.run [--quick] [--only memory,api,...]

Rows are {name, ours, baseline, unit, ratio, target, met, note}; every baseline is measured
in the same run. A benchmark that fails is reported as such and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime

from bench.common import BENCH, ROOT, agent_python

MODULES = ["memory", "inference", "api", "batching", "download", "verify", "quant", "coldstart",
           "ingest", "scale", "wire", "shadow", "soak", "enroll"]


def run_module(name: str, quick: bool) -> tuple[list[dict[str, object]], float, str]:
    env = {**os.environ, "BENCH_QUICK": "1" if quick else "0", "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", f"bench.b_{name}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    dt = time.monotonic() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH_ROWS "):
            return json.loads(line[len("BENCH_ROWS "):]), dt, ""
    return [], dt, (proc.stderr or proc.stdout)[-1500:]


def table(rows: list[dict[str, object]]) -> str:
    head = (f"{'benchmark':58s} {'ours':>10s} {'baseline':>10s} {'unit':>10s} {'ratio':>7s} "
            f"{'target':>19s} met")
    lines = [head, "-" * len(head)]
    for r in rows:
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]  # type: ignore[index]
        lines.append(f"{r['name']!s:58.58s} {r['ours']:>10.4g} {r['baseline']:>10.4g} {r['unit']!s:>10s} "
                     f"{r['ratio']:>7.3g} {r['target']!s:>19s} {met}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    default=os.environ.get("BENCH_QUICK", "") not in ("", "0"))
    ap.add_argument("--only", default="", help="comma-separated: " + ",".join(MODULES))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or MODULES
    agent_python()  # the lean device venv, made once
    started = time.monotonic()
    rows: list[dict[str, object]] = []
    timings: dict[str, float] = {}
    for name in names:
        print(f"bench {name} ...", file=sys.stderr, flush=True)
        got, dt, err = run_module(name, args.quick)
        timings[name] = round(dt, 1)
        if err:
            print(f"bench {name} FAILED:\n{err}", file=sys.stderr)
            got = [{"name": f"{name} (failed)", "ours": float("nan"), "baseline": float("nan"), "unit": "",
                    "ratio": float("nan"), "target": "", "met": False, "note": err.strip().splitlines()[-1]}]
        rows += got
    print(table(rows))
    total = time.monotonic() - started
    print(f"\n{len(rows)} rows in {total:.0f} s ({'quick' if args.quick else 'full'}); "
          f"written to bench/results.json", file=sys.stderr)
    doc = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "quick": args.quick,
           "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version()},
           "seconds": {"total": round(total, 1), **timings}, "rows": rows}
    (BENCH / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
