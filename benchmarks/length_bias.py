"""Why plain TRIM picks short examples, in numbers.

One forward pass over the pool gives the hidden states; every variant (scope, template
scaffolding, penalty, IDF, pooling weights) only changes masks, fingerprints and weights, so all
variants are scored from the same cached hidden states. For each variant it prints the number of
in-domain rows (``dataset == cot`` for gsm), the selection's mean token length and the share of
pool examples whose max term is saturated (max s_j >= 0.999), beside BM25 (bm25s).

    python benchmarks/length_bias.py --pool ../shared/bench/pool-small.jsonl \
        --targets ../shared/bench/targets/gsm/val.jsonl --budget 5% [--model default]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from trim_select.batching import collate, plan_batches
from trim_select.config import RenderConfig
from trim_select.data import Renderer, load_records
from trim_select.fingerprints import build_fingerprints
from trim_select.models import base_model, load_model, model_pad_id
from trim_select.scoring import TokenMatcher, pool_scores, token_idf
from trim_select.selection import select_top

VARIANTS = [
    # name, render overrides, score overrides
    ("spec (all, template scored)", {"scope": "all", "score_template": True}, {}),
    ("spec, mean only", {"scope": "all", "score_template": True}, {"max_weight": 0.0}),
    ("all, content only", {"scope": "all", "score_template": False}, {}),
    ("all, content only, idf", {"scope": "all", "score_template": False}, {"idf": True}),
    ("prompt", {"scope": "prompt"}, {}),
    ("response", {"scope": "response"}, {}),
    ("response, idf", {"scope": "response"}, {"idf": True}),
    ("response, penalty none", {"scope": "response"}, {"penalty": None}),
    ("all, content only, penalty none", {"scope": "all", "score_template": False}, {"penalty": None}),
]


def bm25_select(pool_recs, target_recs, k):
    import bm25s

    def text(r):
        return "\n".join(m.content for m in r.messages)

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([text(r) for r in pool_recs], stopwords="en", show_progress=False),
                    show_progress=False)
    scores = np.full(len(pool_recs), -np.inf)
    for t in target_recs:
        (query,) = bm25s.tokenize([text(t)], stopwords="en", return_ids=False, show_progress=False)
        scores = np.maximum(scores, retriever.get_scores(query))
    return select_top(scores, k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", required=True)
    ap.add_argument("--targets", required=True)
    ap.add_argument("--budget", default="5%")
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--in-domain", default="cot", help="value of the pool's `dataset` field that is in-domain")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    args = ap.parse_args()

    lm = load_model(args.model, dtype=args.dtype)
    pool_recs = load_records(args.pool)
    target_recs = load_records(args.targets)
    k = select_top(np.zeros(len(pool_recs)), args.budget).shape[0]
    in_domain = np.array([r.fields.get("dataset") == args.in_domain for r in pool_recs])

    base_cfg = RenderConfig(scope="all", score_template=True)
    seqs = [Renderer(lm.tokenizer, base_cfg)(r) for r in pool_recs]
    lengths = np.array([len(s) for s in seqs])
    device = next(lm.model.parameters()).device
    pad = model_pad_id(lm.model)

    # -- one forward pass, cache unit hidden states (fp16) --------------------------------------
    t0 = time.perf_counter()
    hidden: list[torch.Tensor | None] = [None] * len(seqs)
    base = base_model(lm.model)
    with torch.no_grad():
        for idx in plan_batches(lengths, 8192, 64):
            batch = collate([seqs[i] for i in idx], device, pad)
            h = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(),
                     use_cache=False).last_hidden_state
            h = torch.nn.functional.normalize(h.float(), dim=-1).half().cpu()
            for r, i in enumerate(idx):
                hidden[i] = h[r, : lengths[i]]
    fwd_s = time.perf_counter() - t0
    print(f"pool {len(seqs)} rows, {lengths.sum()} tokens; forward {fwd_s:.0f}s "
          f"({lengths.sum() / fwd_s:.0f} tokens/s); budget {k}")

    rows = []
    bm = bm25_select(pool_recs, target_recs, k)
    rows.append(("BM25 (bm25s)", int(in_domain[bm].sum()), float(lengths[bm].mean()), float("nan")))
    emb = lm.model.get_input_embeddings().weight
    for name, r_over, s_over in VARIANTS:
        cfg = replace(base_cfg, **r_over)
        renderer = Renderer(lm.tokenizer, cfg)
        targets = [renderer(r) for r in target_recs]
        fp = build_fingerprints(lm.model, targets, layers=6)
        vseqs = [renderer(r) for r in pool_recs]
        assert all(len(a) == len(b) for a, b in zip(vseqs, seqs, strict=True))
        idf = token_idf(vseqs, emb.shape[0]) if s_over.get("idf") else None
        matcher = TokenMatcher(fp, emb, s_over.get("penalty", 1.0), "cpu", idf=idf)
        weights = (s_over.get("mean_weight", 0.5), s_over.get("max_weight", 0.5), 0.05)
        scores = np.zeros(len(seqs))
        maxes = np.zeros(len(seqs))
        for idx in plan_batches(lengths, 65536, 256):
            batch = collate([vseqs[i] for i in idx], torch.device("cpu"), pad)
            h = torch.zeros(len(idx), batch["input_ids"].shape[1], fp.dim)
            for r, i in enumerate(idx):
                h[r, : lengths[i]] = hidden[i].float()
            res = pool_scores(matcher, batch, h, *weights)
            scores[idx] = res["score"].numpy()
            maxes[idx] = res["max"].numpy()
        sel = select_top(scores, k)
        rows.append((name, int(in_domain[sel].sum()), float(lengths[sel].mean()),
                     float(np.mean(np.nan_to_num(maxes, nan=0) >= 0.999))))

    print(f"\n| variant | in-domain ({args.in_domain}) of {k} | mean tokens | max saturated |")
    print("|---|---|---|---|")
    for name, n_in, mean_len, sat in rows:
        sat_s = "" if np.isnan(sat) else f"{sat:.0%}"
        print(f"| {name} | {n_in} | {mean_len:.0f} | {sat_s} |")
    print(f"\npool: {int(in_domain.sum())} in-domain of {len(seqs)}, mean {lengths.mean():.0f} tokens")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "budget": k, "pool_rows": len(seqs), "forward_s": fwd_s}, fh, indent=1)


if __name__ == "__main__":
    main()
