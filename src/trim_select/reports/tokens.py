"""Token view: saliency ``alpha`` (Eq. 7) over targets and per-token matches ``s_j`` (Eq. 10/12)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..batching import collate
from ..config import FingerprintConfig, ScoreConfig
from ..data import Record, Renderer, load_records
from ..fingerprints import Fingerprints, token_saliency
from ..generic import GENERIC_FILE
from ..models import load_model, model_pad_id
from ..scoring import Scorer, explain
from .config import ReportConfig
from .load import PoolData, RunData, model_spec, render_config

# --------------------------------------------------------------------------------------------
# Token view
# --------------------------------------------------------------------------------------------


@dataclass
class TokenRow:
    """One example in the token view: token strings, values and whether each value counts."""

    title: str
    tokens: list[str]
    token_ids: list[int]
    values: list[float]
    active: list[bool]
    notes: list[str]  # per-token tooltip extra ('' when none)
    header: dict[str, Any] = field(default_factory=dict)
    template: list[bool] = field(default_factory=list)  # chat-template scaffolding, not message content
    n_hidden: int = 0  # tokens cut from the display


@dataclass
class TokenView:
    """The target saliency rows and the candidate match rows of one TRIM run."""

    run: str
    targets: list[TokenRow] = field(default_factory=list)
    top: list[TokenRow] = field(default_factory=list)
    bottom: list[TokenRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _tok_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def _cut(row: TokenRow, max_tokens: int) -> TokenRow:
    if len(row.tokens) > max_tokens:
        row.n_hidden = len(row.tokens) - max_tokens
        for name in ("tokens", "token_ids", "values", "active", "notes", "template"):
            setattr(row, name, getattr(row, name)[:max_tokens])
    return row


def _template_mask(content_renderer: Any, rec: Record, seq: Any) -> list[bool]:
    """True where a token is chat-template scaffolding (role headers, a default system prompt),
    False on message content; empty when the two renderings do not line up (e.g. truncation)."""
    content = content_renderer(rec)
    if not np.array_equal(content.input_ids, seq.input_ids):
        return []
    return (~content.scope_mask).tolist()


def recorded_targets(info: dict[str, Any]) -> str | None:
    recorded = info.get("targets")
    path = recorded.get("path") if isinstance(recorded, dict) else recorded
    return path if isinstance(path, str) and path else None


@dataclass
class _ViewContext:
    """What the token view scores with: the model, the run's fingerprints, configs and renderers."""

    lm: Any
    fp: Fingerprints
    fc: FingerprintConfig
    sc: ScoreConfig
    renderer: Renderer
    content_renderer: Renderer
    device: Any
    pad: int


def _context(run: RunData, cfg: ReportConfig, model_cache: dict[str, Any], view: TokenView) -> _ViewContext | None:
    """The model (cached per spec/device/dtype) and the run's settings, or ``None`` with a note why not."""
    if run.fingerprints_path is None:
        view.notes.append(f"{run.label}: no fingerprints.safetensors in {run.dir} (not a TRIM run): no token view.")
        return None
    spec = model_spec(run, cfg)
    if spec is None:
        view.notes.append(f"{run.label}: no model recorded in run.json and no --model given: no token view.")
        return None
    dtype = cfg.dtype or (run.info.get("model") or {}).get("dtype") or "auto"
    key = f"{spec}|{cfg.device}|{dtype}"
    try:
        if key not in model_cache:
            model_cache[key] = load_model(spec, device=cfg.device, dtype=dtype)
        lm = model_cache[key]
    except (OSError, ValueError, RuntimeError) as exc:
        view.notes.append(f"{run.label}: model {spec!r} not available ({exc}): no token view.")
        return None
    fp = Fingerprints.load(run.fingerprints_path)
    want = (fp.meta.get("model") or {}).get("sha256")
    if want and want != lm.sha256:
        view.notes.append(
            f"{run.label}: the fingerprints were built with another model "
            f"({(fp.meta.get('model') or {}).get('name')}) than {spec!r}: no token view."
        )
        return None
    config = run.info.get("config", {})
    rc = render_config(run.info)
    fc_raw = config.get("fingerprint", {}) or {}
    sc_raw = config.get("scoring", {}) or {}
    return _ViewContext(
        lm=lm, fp=fp,
        fc=FingerprintConfig(**{k: v for k, v in fc_raw.items() if k in FingerprintConfig.__dataclass_fields__}),
        sc=ScoreConfig(**{k: v for k, v in sc_raw.items() if k in ScoreConfig.__dataclass_fields__}),
        renderer=Renderer(lm.tokenizer, rc),
        content_renderer=Renderer(lm.tokenizer, replace(rc, scope="all", score_template=False)),
        device=next(lm.model.parameters()).device, pad=model_pad_id(lm.model))


def _target_rows(ctx: _ViewContext, run: RunData, cfg: ReportConfig, view: TokenView, hint: str | None) -> None:
    """Saliency ``alpha`` (Eq. 7) of the first ``cfg.n_targets`` targets, or a note why not."""
    targets = cfg.targets if cfg.targets is not None else recorded_targets(run.info)
    if not targets:
        view.notes.append(
            "no --targets given (run.json does not record the target file): target saliency view skipped."
            + (f" Another run of this report used {hint}; pass --targets {hint} if it is this run's too."
               if hint else ""))
        return
    if not Path(targets).exists():
        view.notes.append(f"target file {targets} not found: target saliency view skipped.")
        return
    tok, fc = ctx.lm.tokenizer, ctx.fc
    for rec in load_records(targets, skip_invalid=True)[: cfg.n_targets]:
        seq = ctx.renderer(rec)
        batch = collate([seq], ctx.device, ctx.pad)
        alpha, _ = token_saliency(ctx.lm.model, batch, fc.layers, fc.row_weight, fc.col_weight)
        active = (seq.scope_mask & ~seq.special_mask).tolist()
        notes = ["" if act else ("special token: not fingerprinted" if sp else "out of scope: not fingerprinted")
                 for act, sp in zip(active, seq.special_mask.tolist(), strict=True)]
        view.targets.append(_cut(TokenRow(
            title=f"target {rec.id}", tokens=_tok_strings(tok, seq.input_ids), token_ids=seq.input_ids.tolist(),
            values=alpha[0].float().cpu().numpy().tolist(), active=active, notes=notes,
            header={"tokens": len(seq)}, template=_template_mask(ctx.content_renderer, rec, seq)), cfg.max_tokens))


def _match_notes(ctx: _ViewContext, seq: Any, ex: Any) -> list[str]:
    """Per-token tooltip of a candidate: why a token is not scored, or its surrogate (Eq. 11-12)."""
    notes = []
    for j in range(len(seq)):
        if not ex.scored[j]:
            notes.append("special token: not scored" if seq.special_mask[j]
                         else ("out of scope: not scored" if not seq.scope_mask[j] else "unseen class: not scored"))
        elif ex.unseen[j]:
            sur = int(ctx.fp.token_ids[ex.fingerprint_row[j]])
            notes.append(f"unseen class → nearest fingerprint {ctx.lm.tokenizer.decode([sur])!r} (id {sur}), "
                         f"λ={ctx.sc.penalty}")
        else:
            notes.append("")
    return notes


def _candidate_row(ctx: _ViewContext, scorer: Scorer, run: RunData, rec: Record, row: int, title: str,
                   position: int, max_tokens: int) -> TokenRow:
    """``s_j`` (Eq. 10/12) of one ranked candidate, its score components and content/template means."""
    seq = ctx.renderer(rec)
    ex = explain(scorer, collate([seq], ctx.device, ctx.pad))
    cols = run.columns
    header = {"rank": position, "score": float(run.score[row])}
    for k in ("mean", "max", "coverage", "n_scored", "n_unseen", "n_tokens"):
        if k in cols:
            header[k] = float(cols[k][row]) if cols[k].dtype.kind == "f" else int(cols[k][row])
    if np.isfinite(ex.score) and not ctx.sc.idf and abs(ex.score - header["score"]) > 1e-3:
        header["recomputed_score"] = ex.score
    tpl = _template_mask(ctx.content_renderer, rec, seq)
    if tpl:
        t = np.asarray(tpl, dtype=bool)
        for name, part in (("content", ex.scored & ~t), ("template", ex.scored & t)):
            header[f"mean s_j {name}"] = float(ex.s[part].mean()) if part.any() else float("nan")
            header[f"n {name}"] = int(part.sum())
    return _cut(TokenRow(title=f"{title} #{header['rank']}: {run.ids[row]}",
                         tokens=_tok_strings(ctx.lm.tokenizer, seq.input_ids), token_ids=seq.input_ids.tolist(),
                         values=ex.s.tolist(), active=ex.scored.tolist(), notes=_match_notes(ctx, seq, ex),
                         header=header, template=tpl), max_tokens)


def build_token_view(
    run: RunData, pool: PoolData, cfg: ReportConfig, model_cache: dict[str, Any], hint: str | None = None
) -> TokenView:
    """Saliency ``alpha`` of the targets (Eq. 7) and ``s_j`` of the top/bottom candidates (Eq. 10/12).

    Anything missing (fingerprints, model, targets, pool records) becomes a note, never an error;
    ``hint`` is a target file recorded by another run of the report, named in that note.
    """
    view = TokenView(run=run.label)
    ctx = _context(run, cfg, model_cache, view)
    if ctx is None:
        return view
    _target_rows(ctx, run, cfg, view, hint)
    sc = ctx.sc
    try:
        generic = run.dir / GENERIC_FILE  # the generic correction's set, when the run used one
        scorer = Scorer(ctx.lm.model, ctx.fp, penalty=sc.penalty, mean_weight=sc.mean_weight,
                        max_weight=sc.max_weight, coverage_weight=sc.coverage_weight,
                        hidden_layer=ctx.fp.meta.get("hidden_layer"),
                        generic=Fingerprints.load(generic) if sc.generic_rows and generic.exists() else None)
    except ValueError as exc:
        view.notes.append(f"{run.label}: {exc}: candidate view skipped.")
        return view
    o = run.order()
    finite = o[np.isfinite(run.score[o])]
    picks = [("top", k + 1, int(i)) for k, i in enumerate(finite[: cfg.n_examples])]
    picks += [("bottom", len(finite) - k, int(i)) for k, i in enumerate(finite[::-1][: cfg.n_examples])]
    missing = 0
    for which, position, row in picks:
        rec = pool.records.get(int(run.index[row]))
        if rec is None:
            missing += 1
            continue
        tr = _candidate_row(ctx, scorer, run, rec, row, which, position, cfg.max_tokens)
        (view.top if which == "top" else view.bottom).append(tr)
    if missing:
        view.notes.append(f"{missing} candidate(s) could not be read back from the pool file: not shown.")
    return view
