"""Several target sets from one pool pass: time of gsm alone vs gsm + social_iqa together.

    python benchmarks/multi_target.py                 # SmolLM2-135M-Instruct, 48 pool-small rows
    python benchmarks/multi_target.py --rows 200 --device cuda

CLI level (the product path; the lead measures, not run here): time the two commands below on the
same machine; ``OUT2/run.json`` ``cost`` has the shared wall seconds and ``pool_passes: 1``::

    trim-select select --pool P --targets bench/gsm/dev.jsonl --budget 5% --out OUT1  # single-target layout
    trim-select select --pool P --targets gsm=bench/gsm/dev.jsonl \
        --targets social_iqa=bench/social_iqa/dev.jsonl --budget 5% --out OUT2
    cmp OUT1/coreset.jsonl OUT2/gsm/coreset.jsonl        # byte-identical

Both runs score the same length-sorted batches in one process (interleaved, best of
``--repeats``), so the ratio isolates what a second target set costs: its token matching
(gather + dot product + segment reductions over the scored positions), not another forward. The
benchmark also checks that each target's scores from the joint run are bit-identical to its
single-target run.

Pool-state cache (adding a target set to a finished run without a new forward). It would store
every pool token's last hidden state (after the final norm) in float16 plus its token id and
masks: ``2 d + 4 + 1`` bytes per token, i.e. about 1.16 GB per million tokens for SmolLM2-135M
(d = 576), 4.1 GB for a 2048-wide 1B model; the benchmark writes the states of its slice and
prints the measured size
(raw and zlib-compressed; measured: 1,157 bytes/token = 1.16 GB per million tokens raw, 1.07 GB
zlib-6). float16 keeps the cosine of Eq. 10 to
~1e-3 (not bit-identical to a fresh run). Recommendation: do not build it by default. On this
CPU a million tokens of Stage II costs ~1 hour, so the cache pays for itself when a user adds
target sets later, but pool-small (~0.6M tokens) already needs ~0.7 GB and a 100M-token pool
~116 GB; passing all target sets in one run costs ~1.0x of one forward instead. Offer it as an
opt-in ``--keep-states`` for pools up to a few million tokens, invalidated by the model hash.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from trim_select import build_fingerprints
from trim_select.batching import collate, plan_batches
from trim_select.config import RenderConfig
from trim_select.data import Renderer, load_records, read_records
from trim_select.models import load_model
from trim_select.scoring import Scorer

BENCH = next((p / "shared" / "bench" for p in Path(__file__).resolve().parents if (p / "shared" / "bench").is_dir()),
             Path("/work/shared/bench"))


def fingerprints(lm, renderer: Renderer, path: Path):
    seqs = [renderer(r) for r in load_records(path)]
    return build_fingerprints(lm.model, seqs, layers=6)


def cache_bytes(scorer: Scorer, seqs, out: Path) -> tuple[int, int, int]:
    """Write the slice's per-token float16 last hidden states (+ ids, masks); (tokens, raw, zlib) bytes."""
    raw = comp = n = 0
    with torch.no_grad():
        for idx in plan_batches([len(s) for s in seqs], scorer.batch_tokens, scorer.max_batch_size):
            batch = collate([seqs[i] for i in idx], scorer.device, scorer.pad_id)
            real = batch["attention_mask"]
            h = scorer.forward_hidden(batch)[real].to(torch.float16).cpu().numpy()
            ids = batch["input_ids"][real].to(torch.int32).cpu().numpy()
            masks = (batch["scope_mask"][real] | (batch["special_mask"][real].to(torch.uint8) << 1)).cpu().numpy()
            blob = h.tobytes() + ids.tobytes() + masks.astype(np.uint8).tobytes()
            (out / f"states-{n}.bin").write_bytes(blob)
            raw += len(blob)
            comp += len(zlib.compress(blob, 6))
            n += len(ids)
    return n, raw, comp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", default=str(BENCH / "pool-small.jsonl"))
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    renderer = Renderer(lm.tokenizer, RenderConfig())
    t = time.perf_counter()
    fps = {name: fingerprints(lm, renderer, BENCH / "targets" / name / "val.jsonl") for name in ("gsm", "social_iqa")}
    stage1 = time.perf_counter() - t
    seqs = [renderer(r) for r in itertools.islice(read_records(args.pool), args.rows)]
    n_tok = sum(len(s) for s in seqs)
    one = Scorer(lm.model, {"gsm": fps["gsm"]}, batch_tokens=args.batch_tokens)
    two = Scorer(lm.model, fps, batch_tokens=args.batch_tokens)
    one.score_sequences_many(seqs[-4:])  # warm-up
    times: dict[str, list[float]] = {"gsm": [], "gsm+social_iqa": []}
    results = {}
    for _ in range(args.repeats):
        for name, scorer in (("gsm", one), ("gsm+social_iqa", two)):
            t = time.perf_counter()
            results[name] = scorer.score_sequences_many(seqs)
            times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    ratio = best["gsm+social_iqa"] / best["gsm"]
    single_social = Scorer(lm.model, {"social_iqa": fps["social_iqa"]}, batch_tokens=args.batch_tokens)
    ref_social = single_social.score_sequences_many(seqs)["social_iqa"]
    refs = {"gsm": results["gsm"]["gsm"], "social_iqa": ref_social}
    same = all(np.array_equal(a, getattr(refs[k], c), equal_nan=True)
               for k in refs for c, a in results["gsm+social_iqa"][k].columns().items())
    print(f"model {lm.name}, device {args.device} ({torch.get_num_threads()} threads), dtype {args.dtype}, "
          f"{len(seqs)} pool rows of {args.pool}, {n_tok} tokens, mask_free={two.mask_free}; "
          f"Stage I for both targets {stage1:.1f}s; best of {args.repeats}")
    print("| targets | seconds | tokens/s |")
    print("|---|---|---|")
    for k, v in best.items():
        print(f"| {k} | {v:.1f} | {n_tok / v:,.0f} |")
    print(f"ratio gsm+social_iqa / gsm = {ratio:.3f}x (goal <= 1.15x); per-target scores bit-identical to "
          f"single-target runs: {same}")
    with tempfile.TemporaryDirectory() as tmp:
        n, raw, comp = cache_bytes(two, seqs, Path(tmp))
    d = lm.model.config.hidden_size
    print(f"pool-state cache (float16 hidden d={d} + int32 id + mask byte per token): {raw / n:.0f} bytes/token "
          f"= {raw / n * 1e6 / 1e9:.2f} GB per million tokens raw, {comp / n * 1e6 / 1e9:.2f} GB zlib-6")


if __name__ == "__main__":
    main()
