"""Peak host memory of a full `select` run does not grow with the pool size.

Writes synthetic pools of each size, runs `trim-select select` on each in a fresh subprocess with a
tiny random-init model, and prints the peak resident set size (ru_maxrss of the child) and the
ratio to the smallest pool.

    python benchmarks/memory.py --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trim_select.testing import make_model_dir

CHILD = """
import resource, sys
from trim_select.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def write_pool(path: Path, n: int) -> None:
    with open(path, "w") as fh:
        for i in range(n):
            row = {"id": f"r{i}", "prompt": f"How many clips did Natalia sell in month {i % 12}?",
                   "response": f"She sold {i % 97} clips. #### {i % 97}"}
            fh.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--chunk-size", type=int, default=2048)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model_dir(tmp / "model")
        targets = tmp / "targets.jsonl"
        targets.write_text(json.dumps({"prompt": "How many clips did Natalia sell?", "response": "72. #### 72"}) + "\n")
        rows = []
        for n in args.sizes:
            pool = tmp / f"pool-{n}.jsonl"
            write_pool(pool, n)
            t = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, "select", "--pool", str(pool), "--targets", str(targets),
                 "--budget", "5%", "--out", str(tmp / f"out-{n}"), "--model", str(model), "--dtype", "float32",
                 "--chunk-size", str(args.chunk_size), "--quiet"],
                capture_output=True, text=True, check=True,
            )
            secs = time.perf_counter() - t
            kb = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB")))
            rows.append((n, kb / 1024, secs))
        base = rows[0][1]
        print(f"tiny model, chunk size {args.chunk_size}")
        print("| pool rows | peak RSS (MiB) | vs smallest | wall s |")
        print("|---|---|---|---|")
        for n, mib, secs in rows:
            print(f"| {n:,} | {mib:.0f} | {mib / base:.2f}x | {secs:.0f} |")


if __name__ == "__main__":
    main()
