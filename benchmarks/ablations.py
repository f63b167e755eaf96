"""TRIM ablations (issue #16): which scoring variant picks target-specific coresets?

One forward pass over the pool caches unit hidden states (float16) of the layers asked for; every
variant only changes fingerprints, masks and reductions, so all of them, for every target task, are
scored from the same states. The cache is written in parts (atomic), so a killed run resumes.

Variants (defined in docs/SPEC.md "Extensions"):

- ``spec``: the paper exactly (template tokens scored, Eq. 15 with coverage over all tokens);
- ``content`` (product default until now): message content only;
- ``skip-k``: positions among the first k tokens of each message's content are left out of the
  max term (their state is fixed by the shared template prefix, so an equal first token gives
  ``s_j = 1`` whatever follows); ``skip-k-both`` also leaves them out of the mean;
- ``nocov``: coverage counted over content tokens only (with ``penalty = 1`` every content token
  is scored, so this is the coverage term removed);
- ``classnorm``: per-class normalisation: ``s_j - mu_t`` where ``mu_t`` is the mean similarity of
  the pool's occurrences of class ``t`` to ``f_t`` (a token that looks like the target in every
  pool row carries no target-specific signal);
- ``generic``: the score minus the score against a generic fingerprint set (built from seeded
  random pool rows);
- ``layer-N``: fingerprints and states from hidden layer N instead of the last one.

For every variant and task it prints: in-domain rows (``--in-domain task=dataset``), mean tokens
vs the pool, overlap with BM25's coreset, overlap between the tasks' coresets, and overlap with
the coreset selected by the generic (random-row) targets: a measure of target-independent hubs.

    python benchmarks/ablations.py --pool ../shared/bench/pool-small.jsonl \
        --task gsm=../shared/bench/targets/gsm/val.jsonl \
        --task social_iqa=../shared/bench/targets/social_iqa/val.jsonl \
        --in-domain gsm=cot --budget 5% --cache /tmp/ablation-cache --out benchmarks/results/ablations

``--scores-out DIR --variants generic,layer-20`` also writes each named variant's full score vector
as ``DIR/<variant>/<task>/scores.parquet`` (``index``, ``id``, ``score``: the columns ``select``
writes; the generic rows are not masked out, as in the product), a ranking that ``trim-select
compare --selection ablation-generic=DIR/generic`` trains and scores like any method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from trim_select.batching import collate, plan_batches
from trim_select.config import RenderConfig
from trim_select.data import Renderer, load_records
from trim_select.fingerprints import Fingerprints, build_fingerprints, token_saliency
from trim_select.models import base_model, embedding_matrix, load_model
from trim_select.scoring import TokenMatcher
from trim_select.selection import select_top

BATCH_TOKENS = 8192


@dataclass(frozen=True)
class Variant:
    name: str
    template: bool = False  # score template tokens (exact spec)
    layer: int = -1
    skip_max: int = 0  # leave the first k content tokens of each message out of the max
    skip_mean: int = 0  # ... and out of the mean
    coverage: str = "all"  # all: |M|/|c| (Eq. 15); none: counted over content (= constant 1)
    norm: str = "none"  # none | classnorm | generic


def variants(layers: list[int]) -> list[Variant]:
    out = [Variant("spec", template=True), Variant("content")]
    out += [Variant(f"skip-{k}", skip_max=k) for k in (1, 2, 4, 8)]
    out += [Variant(f"skip-{k}-both", skip_max=k, skip_mean=k) for k in (2, 4)]
    out += [Variant("nocov", coverage="none"), Variant("classnorm", norm="classnorm"),
            Variant("generic", norm="generic")]
    out += [Variant("skip-4+nocov", skip_max=4, coverage="none"),
            Variant("skip-4+classnorm", skip_max=4, norm="classnorm"),
            Variant("skip-4+generic", skip_max=4, norm="generic"),
            Variant("skip-4+nocov+classnorm", skip_max=4, coverage="none", norm="classnorm")]
    out += [Variant(f"layer-{n}", layer=n) for n in layers if n != -1]
    out += [Variant(f"layer-{n}+skip-4", layer=n, skip_max=4) for n in layers if n != -1]
    return out


# -- one forward pass over the pool, cached ---------------------------------------------------


def hidden_layers(lm, batch, layers: list[int]) -> dict[int, torch.Tensor]:
    """Unit hidden states of the asked layers (-1 = last, after the final norm)."""
    base = base_model(lm.model)
    want_all = any(n != -1 for n in layers)
    out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(), use_cache=False,
               output_hidden_states=want_all)
    res = {}
    for n in layers:
        h = out.last_hidden_state if n == -1 else out.hidden_states[n]
        res[n] = torch.nn.functional.normalize(h.float(), dim=-1)
    return res


def pool_states(lm, seqs, layers: list[int], cache: Path, part_rows: int = 64) -> dict[int, np.ndarray]:
    """Flat [N_tokens, d] float16 unit states per layer, in pool order; resumable parts in ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(s) for s in seqs])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    d = lm.model.config.hidden_size
    flat = {n: np.zeros((offsets[-1], d), dtype=np.float16) for n in layers}
    device = next(lm.model.parameters()).device
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    batches = plan_batches(lengths, BATCH_TOKENS, 64)
    parts, cur, size = [], [], 0
    for b in batches:  # parts of whole batches, so a resumed run forwards the same batches
        cur.append(b)
        size += len(b)
        if size >= part_rows:
            parts.append(cur)
            cur, size = [], 0
    if cur:
        parts.append(cur)
    t0, done_tokens, fresh_tokens = time.perf_counter(), 0, 0
    for p, part in enumerate(parts):
        path = cache / f"part-{p:05d}-{'_'.join(str(n) for n in layers)}.npz"
        rows = np.concatenate(part)
        if not path.exists():
            got = {n: [] for n in layers}
            with torch.no_grad():
                for b in part:
                    batch = collate([seqs[i] for i in b], device, pad)
                    hs = hidden_layers(lm, batch, layers)
                    for n in layers:
                        got[n] += [hs[n][r, : lengths[i]].half().cpu().numpy() for r, i in enumerate(b)]
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, rows=rows, **{f"l{n}": np.concatenate(got[n]) for n in layers})
            os.replace(tmp, path)
            fresh_tokens += int(lengths[rows].sum())
        with np.load(path) as npz:  # each key read once: NpzFile re-reads an array on every access
            z = {n: npz[f"l{n}"] for n in layers}
        pos = 0
        for i in rows:
            for n in layers:
                flat[n][offsets[i]:offsets[i + 1]] = z[n][pos:pos + lengths[i]]
            pos += lengths[i]
        done_tokens += int(lengths[rows].sum())
        el = time.perf_counter() - t0
        print(f"\rstates: part {p + 1}/{len(parts)}, {done_tokens}/{offsets[-1]} tokens, {el:.0f}s", end="",
              flush=True)
    print()
    return flat, fresh_tokens, time.perf_counter() - t0


# -- fingerprints at any layer -----------------------------------------------------------------


@torch.no_grad()
def fingerprints_at(lm, targets, layer: int) -> Fingerprints:
    """Stage I (Eq. 1-9) with the states of ``layer``; the last layer uses the product's code."""
    if layer == -1:
        return build_fingerprints(lm.model, targets, layers=6)
    device = next(lm.model.parameters()).device
    ids_all, w_all, h_all = [], [], []
    for t in targets:  # one target at a time: saliency does not depend on batching (tested in product)
        batch = collate([t], device, 0)
        alpha, _ = token_saliency(lm.model, batch, 6)
        h = hidden_layers(lm, batch, [layer])[layer]
        take = batch["attention_mask"] & batch["scope_mask"] & ~batch["special_mask"]
        ids_all.append(batch["input_ids"][take])
        w_all.append(alpha[take].double())
        h_all.append(h[take].double())
    ids = torch.cat(ids_all)
    classes, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    sums = torch.zeros(len(classes), h_all[0].shape[1], dtype=torch.float64).index_add_(
        0, inverse, torch.cat(w_all)[:, None] * torch.cat(h_all))
    norms = sums.norm(dim=-1)
    keep = norms >= 1e-12
    fp = Fingerprints(classes[keep].numpy(), (sums[keep] / norms[keep, None]).float().numpy(),
                      torch.bincount(inverse)[keep].numpy(), {"layer": layer})
    return fp.with_nearest(embedding_matrix(lm.model))


# -- scoring every variant from the flat states --------------------------------------------------


def token_sims(fp: Fingerprints, emb: torch.Tensor, states: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``s_j`` (Eq. 10/12, lambda = 1) for every pool token."""
    m = TokenMatcher(fp, emb, 1.0, "cpu")
    out = np.zeros(len(ids), dtype=np.float32)
    vec, row = m.vectors, m.row
    for a in range(0, len(ids), 1 << 16):
        t = torch.from_numpy(ids[a:a + (1 << 16)])
        h = torch.from_numpy(states[a:a + (1 << 16)]).float()
        out[a:a + len(t)] = (h * vec[row[t]]).sum(-1).numpy()
    return out


def reduce_scores(s: np.ndarray, seg: np.ndarray, n: int, mean_mask: np.ndarray, max_mask: np.ndarray,
                  cov: np.ndarray) -> np.ndarray:
    """Eq. 15 with separate masks for the mean and the max terms; rows with nothing scored: -inf."""
    cnt = np.bincount(seg[mean_mask], minlength=n)
    mean = np.bincount(seg[mean_mask], weights=s[mean_mask], minlength=n) / np.maximum(cnt, 1)
    mx = torch.full((n,), float("-inf"), dtype=torch.float64).scatter_reduce_(
        0, torch.from_numpy(seg[max_mask]), torch.from_numpy(s[max_mask].astype(np.float64)), "amax").numpy()
    no_max = ~np.isfinite(mx)
    mx[no_max] = mean[no_max]  # a row shorter than the skipped prefix: its max falls back to its mean
    out = 0.5 * mean + 0.5 * mx + 0.05 * cov
    out[cnt == 0] = -np.inf
    return out


def score_variant(v: Variant, sims: np.ndarray, ctx: dict) -> np.ndarray:
    seg, n, ids = ctx["seg"], ctx["n"], ctx["ids"]
    scored = ctx["nonspecial"] if v.template else ctx["content"]
    s = sims.astype(np.float64)
    if v.norm == "classnorm":
        c = np.bincount(ids[scored], minlength=ctx["vocab"])
        mu = np.bincount(ids[scored], weights=s[scored], minlength=ctx["vocab"]) / np.maximum(c, 1)
        s = s - mu[ids]
    late_max = ctx["runpos"] >= v.skip_max if not v.template else np.ones_like(scored)
    late_mean = ctx["runpos"] >= v.skip_mean if not v.template else np.ones_like(scored)
    cov = np.bincount(seg[scored], minlength=n) / ctx["lengths"] if v.coverage == "all" else np.ones(n)
    return reduce_scores(s, seg, n, scored & late_mean, scored & late_max, cov)


def content_run_position(content: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """For each token, its index inside its run of content tokens (message); -1 outside content."""
    idx = np.arange(len(content))
    start = content & ~np.concatenate([[False], content[:-1] & (seg[1:] == seg[:-1])])
    last_start = np.maximum.accumulate(np.where(start, idx, 0))
    return np.where(content, idx - last_start, -1)


# -- metrics ----------------------------------------------------------------------------------------


def bm25_top(pool_recs, target_recs, k: int) -> np.ndarray:
    import bm25s

    text = lambda r: "\n".join(m.content for m in r.messages)  # noqa: E731
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([text(r) for r in pool_recs], stopwords="en", show_progress=False),
                    show_progress=False)
    best = np.full(len(pool_recs), -np.inf)
    for t in target_recs:
        (q,) = bm25s.tokenize([text(t)], stopwords="en", return_ids=False, show_progress=False)
        best = np.maximum(best, retriever.get_scores(q))
    return select_top(best, k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", required=True)
    ap.add_argument("--task", action="append", required=True, help="NAME=TARGETS.jsonl")
    ap.add_argument("--in-domain", action="append", default=[], help="NAME=DATASET (pool `dataset` field)")
    ap.add_argument("--budget", default="5%")
    ap.add_argument("--layers", default="-1,20", help="hidden layers to cache (-1 = last)")
    ap.add_argument("--generic-rows", type=int, default=10)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=None, help="first N pool rows only (smoke runs)")
    ap.add_argument("--scores-out", default=None, help="write full score vectors of --variants here")
    ap.add_argument("--variants", default="", help="comma list of variants for --scores-out (default: all)")
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = [int(x) for x in args.layers.split(",")]
    lm = load_model("default")
    pool = load_records(args.pool)[: args.limit]
    tasks = dict(t.split("=", 1) for t in args.task)
    in_domain = dict(t.split("=", 1) for t in args.in_domain)
    spec_r = Renderer(lm.tokenizer, RenderConfig(scope="all", score_template=True))
    cont_r = Renderer(lm.tokenizer, replace(spec_r.config, score_template=False))
    seqs = [cont_r(r) for r in pool]
    n = len(seqs)
    lengths = np.array([len(s) for s in seqs])
    k = select_top(np.zeros(n), args.budget).shape[0]
    states, fresh, fwd_s = pool_states(lm, seqs, layers, Path(args.cache))
    ids = np.concatenate([s.input_ids for s in seqs])
    seg = np.repeat(np.arange(n), lengths)
    special = np.concatenate([s.special_mask for s in seqs])
    content = np.concatenate([s.scope_mask for s in seqs]) & ~special
    ctx = {"seg": seg, "n": n, "ids": ids, "lengths": lengths, "nonspecial": ~special, "content": content,
           "runpos": content_run_position(content, seg), "vocab": int(embedding_matrix(lm.model).shape[0])}
    emb = embedding_matrix(lm.model)
    rng = np.random.default_rng(0)
    generic_idx = np.sort(rng.choice(n, args.generic_rows, replace=False))
    eligible = np.ones(n, dtype=bool)
    eligible[generic_idx] = False  # the generic targets' own rows never count as selected
    sets = {name: load_records(path) for name, path in tasks.items()}
    sets["_generic"] = [pool[i] for i in generic_idx]
    results, scores = run_variants(lm, sets, variants(layers), states, ctx, spec_r, cont_r, emb, eligible, k)
    if args.scores_out:
        write_scores(Path(args.scores_out), scores, pool, [v for v in args.variants.split(",") if v])
    bm = {t: bm25_top(pool, sets[t], k).tolist() for t in tasks}
    table = metrics(results, bm, pool, lengths, in_domain, list(tasks), k)
    write_outputs(Path(args.out), args, table, results, bm, k, n, lengths, fresh, fwd_s)


def run_variants(lm, sets, vs, states, ctx, spec_r, cont_r, emb, eligible, k) -> dict:
    fps = {}
    for name, recs in sets.items():
        for template in (True, False):
            r = spec_r if template else cont_r
            for layer in {v.layer for v in vs if v.template == template}:
                fps[(name, template, layer)] = fingerprints_at(lm, [r(x) for x in recs], layer)
    sims = {key: token_sims(fp, emb, states[key[2]], ctx["ids"]) for key, fp in fps.items()}
    out, scores = {}, {}
    for v in vs:
        generic = score_variant(replace(v, norm="none"), sims[("_generic", v.template, v.layer)], ctx)
        out[(v.name, "_generic")] = select_top(np.where(eligible, generic, -np.inf), k).tolist()
        for name in sets:
            if name == "_generic":
                continue
            s = score_variant(v, sims[(name, v.template, v.layer)], ctx)
            if v.norm == "generic":
                s = s - generic
            scores[(v.name, name)] = s
            out[(v.name, name)] = select_top(np.where(eligible, s, -np.inf), k).tolist()
    return out, scores


def write_scores(root: Path, scores: dict, pool, names: list[str]) -> None:
    """``root/<variant>/<task>/scores.parquet`` of the named variants (all when ``names`` is empty)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    known = {v for v, _ in scores}
    if set(names) - known:
        raise SystemExit(f"unknown variants {sorted(set(names) - known)}; known: {sorted(known)}")
    index, ids = np.array([r.index for r in pool], dtype=np.int64), [str(r.id) for r in pool]
    for (variant, task), s in scores.items():
        if names and variant not in names:
            continue
        d = root / variant / task
        d.mkdir(parents=True, exist_ok=True)
        table = pa.table({"index": index, "id": ids, "score": np.asarray(s, dtype=np.float64)})
        pq.write_table(table, d / "scores.parquet.tmp")
        os.replace(d / "scores.parquet.tmp", d / "scores.parquet")
        print(f"wrote {d / 'scores.parquet'}")


def metrics(results, bm, pool, lengths, in_domain, tasks, k) -> list[dict]:
    src = np.array([r.fields.get("dataset") for r in pool])
    rows = []
    names = list(dict.fromkeys(v for v, _ in results))
    for v in ["bm25", *names]:
        row = {"variant": v}
        sel = {t: (bm[t] if v == "bm25" else results[(v, t)]) for t in tasks}
        for t in tasks:
            row[f"{t}:mean_tokens"] = float(lengths[sel[t]].mean())
            if t in in_domain:
                row[f"{t}:in_domain"] = int((src[sel[t]] == in_domain[t]).sum())
            if v != "bm25":
                row[f"{t}:bm25_overlap"] = len(set(sel[t]) & set(bm[t]))
                row[f"{t}:generic_overlap"] = len(set(sel[t]) & set(results[(v, "_generic")]))
            vals, cnt = np.unique(src[sel[t]], return_counts=True)
            row[f"{t}:mix"] = {str(a): int(b) for a, b in zip(vals, cnt, strict=True)}
        if len(tasks) >= 2:
            row["task_overlap"] = len(set(sel[tasks[0]]) & set(sel[tasks[1]]))
        rows.append(row)
    return rows


def markdown(table, tasks, in_domain, k, n, pool_mean) -> str:
    head = ["variant"]
    for t in tasks:
        head += ([f"{t} in-domain ({in_domain[t]}) /{k}"] if t in in_domain else []) + [
            f"{t} mean tok", f"{t} ∩ bm25", f"{t} ∩ generic"]
    head += ["gsm ∩ siqa" if len(tasks) >= 2 else ""]
    lines = [f"Pool {n} rows (mean {pool_mean:.0f} tokens), budget {k}; SmolLM2-135M-Instruct, no warmup.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["variant"]]
        for t in tasks:
            if t in in_domain:
                cells.append(str(r.get(f"{t}:in_domain", "")))
            cells += [f"{r[f'{t}:mean_tokens']:.0f}", str(r.get(f"{t}:bm25_overlap", "–")),
                      str(r.get(f"{t}:generic_overlap", "–"))]
        cells.append(str(r.get("task_overlap", "")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, args, table, results, bm, k, n, lengths, fresh, fwd_s) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t.split("=", 1)[0] for t in args.task]
    in_domain = dict(t.split("=", 1) for t in args.in_domain)
    md = markdown(table, tasks, in_domain, k, n, float(lengths.mean()))
    print(md)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": "python benchmarks/ablations.py " + " ".join(
        f"{a}" for a in sys.argv[1:]), "git": sha, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "pool_rows": n, "pool_tokens": int(lengths.sum()), "budget": k,
        "forward_tokens_this_run": fresh, "states_seconds": round(fwd_s, 1)}
    (out / "ablations.md").write_text(md + "\n```\n" + json.dumps(meta, indent=1) + "\n```\n")
    sel = {f"{v}|{t}": idx for (v, t), idx in results.items()}
    sel.update({f"bm25|{t}": idx for t, idx in bm.items()})
    (out / "ablations.json").write_text(json.dumps({"meta": meta, "table": table, "selected": sel}, indent=1))


if __name__ == "__main__":
    main()
