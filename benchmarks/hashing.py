"""Cost of the content digest (xxh3-128, ``trim_select.io.content_digest``) on a synthetic pool.

    PYTHONPATH=src python benchmarks/hashing.py --gb 1 --stage2-tokens-per-s 2000

Writes a ``--gb`` GB jsonl pool of chat rows to a temporary folder, hashes it once (cold memo) and
again (memoised: only a stat), and states the share of a ``select`` run the hash adds, assuming
Stage II runs at ``--stage2-tokens-per-s`` (measure it with benchmarks/stage2.py on the machine) and
that a row of this pool holds ``bytes / 4`` tokens (the usual ~4 bytes per token of English text).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from trim_select.io import content_digest


def make_pool(path: Path, gb: float) -> int:
    row = json.dumps({"id": "r", "messages": [{"role": "user", "content": "How many clips did Natalia sell? " * 8},
                                              {"role": "assistant", "content": "She sold 72 clips. #### 72 " * 8}]})
    line = (row + "\n").encode()
    block = line * max(1, (1 << 24) // len(line))
    target, written = int(gb * 1e9), 0
    with open(path, "wb") as fh:
        while written < target:
            fh.write(block)
            written += len(block)
    return written


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--stage2-tokens-per-s", type=float, default=2000.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool.jsonl"
        size = make_pool(pool, args.gb)
        t0 = time.perf_counter()
        content_digest(pool)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        content_digest(pool)
        memo = time.perf_counter() - t0
    stage2 = (size / 4) / args.stage2_tokens_per_s
    print(json.dumps({"bytes": size, "hash_s": round(cold, 3), "gb_per_s": round(size / 1e9 / cold, 2),
                      "memoised_s": round(memo, 6), "stage2_s_estimate": round(stage2, 1),
                      "share_of_select": f"{100 * cold / (cold + stage2):.4f}%",
                      "assumption": f"{args.stage2_tokens_per_s:g} Stage II tokens/s, 4 bytes per token"}))


if __name__ == "__main__":
    main()
