"""Host pipeline throughput: read + chat-template render + tokenise + collate, tokens/s per process.

    python benchmarks/host_pipeline.py                       # tiny + SmolLM2 tokenizers, 1 and 2 workers
    python benchmarks/host_pipeline.py --rows 2000 --workers 1 2 4

Measures what feeds Stage II, with no forward at all (the forward of the tiny model would be
nearly free; here it is left out so the figure is the host side alone): reading and validating
the pool file (:func:`read_records`), rendering each record with the chat template, tokenising
with one batch call of the Rust tokenizer with offsets (scope masks from them,
:meth:`Renderer.render_many`) and collating length-sorted token-budget batches. ``workers``
processes (``RuntimeConfig.tokenizer_workers``) render chunks in parallel (:class:`RenderPool`).

An accelerator consuming ``R`` tokens/s of Stage II needs ``ceil(R / per_process)`` rendering
processes; the script prints that for one H100 at ~150,000 tokens/s (the SmolLM2-135M bf16
Stage II rate, ``benchmarks/stage2.py``).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch

from trim_select.batching import collate, plan_batches
from trim_select.config import RenderConfig
from trim_select.data import Message, Renderer, read_records
from trim_select.host import RenderPool
from trim_select.models import default_model_path
from trim_select.testing import make_tokenizer

BENCH = next((p / "shared" / "bench" for p in Path(__file__).resolve().parents if (p / "shared" / "bench").is_dir()),
             Path("/work/shared/bench"))
H100_STAGE2 = 150_000


def run_once(path: str, rows: int, pool: RenderPool, batch_tokens: int) -> tuple[int, float]:
    """Read ``rows`` records, render + tokenise them through ``pool``, collate; (tokens, seconds)."""
    t = time.perf_counter()
    recs = []
    for r in read_records(path, track_ids=False):
        recs.append(r)
        if len(recs) >= rows:
            break
    seqs = pool.render(recs)
    cpu = torch.device("cpu")
    for idx in plan_batches([len(s) for s in seqs], batch_tokens):
        collate([seqs[i] for i in idx], cpu)
    return sum(len(s) for s in seqs), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", default=str(BENCH / "pool-small.jsonl"))
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process: a per-process figure

    from transformers import AutoTokenizer

    toks = {"tiny (testing.make_tokenizer)": make_tokenizer(),
            "SmolLM2-135M-Instruct": AutoTokenizer.from_pretrained(str(default_model_path()), local_files_only=True)}
    print(f"{args.rows} rows of {args.pool}, {os.cpu_count()} CPUs, best of {args.repeats}; "
          f"TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}")
    print("| tokenizer | worker processes | tokens | seconds | tokens/s | tokens/s per process |")
    print("|---|---|---|---|---|---|")
    for name, tok in toks.items():
        renderer = Renderer(tok, RenderConfig())
        per_process = None
        for w in args.workers:
            with RenderPool(renderer, w) as pool:  # worker start-up (spawn + import) is one-off: warmed first
                pool.render([[Message("user", "warm up")]] * max(1, pool.chunk * w))
                best = min((run_once(args.pool, args.rows, pool, args.batch_tokens) for _ in range(args.repeats)),
                           key=lambda x: x[1])
            n, s = best
            procs = max(w, 1)
            if w == 0:
                per_process = n / s
            print(f"| {name} | {w or 'none (in process)'} | {n:,} | {s:.2f} | {n / s:,.0f} | {n / s / procs:,.0f} |")
        if per_process:
            need = math.ceil(H100_STAGE2 / per_process)
            print(f"| {name}: one H100 at ~{H100_STAGE2:,} tokens/s of Stage II needs {H100_STAGE2 / per_process:.1f} "
                  f"processes -> tokenizer_workers={need} | | | | | |")


if __name__ == "__main__":
    main()
