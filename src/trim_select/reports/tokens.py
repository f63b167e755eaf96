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


def build_token_view(
    run: RunData, pool: PoolData, cfg: ReportConfig, model_cache: dict[str, Any], hint: str | None = None
) -> TokenView:
    """Saliency ``alpha`` of the targets (Eq. 7) and ``s_j`` of the top/bottom candidates (Eq. 10/12).

    Anything missing (fingerprints, model, targets, pool records) becomes a note, never an error;
    ``hint`` is a target file recorded by another run of the report, named in that note.
    """
    view = TokenView(run=run.label)
    if run.fingerprints_path is None:
        view.notes.append(f"{run.label}: no fingerprints.safetensors in {run.dir} (not a TRIM run): no token view.")
        return view
    spec = model_spec(run, cfg)
    if spec is None:
        view.notes.append(f"{run.label}: no model recorded in run.json and no --model given: no token view.")
        return view
    dtype = cfg.dtype or (run.info.get("model") or {}).get("dtype") or "auto"
    key = f"{spec}|{cfg.device}|{dtype}"
    try:
        if key not in model_cache:
            model_cache[key] = load_model(spec, device=cfg.device, dtype=dtype)
        lm = model_cache[key]
    except (OSError, ValueError, RuntimeError) as exc:
        view.notes.append(f"{run.label}: model {spec!r} not available ({exc}): no token view.")
        return view
    fp = Fingerprints.load(run.fingerprints_path)
    want = (fp.meta.get("model") or {}).get("sha256")
    if want and want != lm.sha256:
        view.notes.append(
            f"{run.label}: the fingerprints were built with another model "
            f"({(fp.meta.get('model') or {}).get('name')}) than {spec!r}: no token view."
        )
        return view
    config = run.info.get("config", {})
    rc = render_config(run.info)
    fc_raw = config.get("fingerprint", {}) or {}
    fc = FingerprintConfig(**{k: v for k, v in fc_raw.items() if k in FingerprintConfig.__dataclass_fields__})
    sc_raw = config.get("scoring", {}) or {}
    sc = ScoreConfig(**{k: v for k, v in sc_raw.items() if k in ScoreConfig.__dataclass_fields__})
    renderer = Renderer(lm.tokenizer, rc)
    content_renderer = Renderer(lm.tokenizer, replace(rc, scope="all", score_template=False))
    device = next(lm.model.parameters()).device
    pad = model_pad_id(lm.model)
    tok = lm.tokenizer

    # -- targets: alpha (Eq. 7) -------------------------------------------------------------
    targets = cfg.targets if cfg.targets is not None else recorded_targets(run.info)
    if not targets:
        view.notes.append(
            "no --targets given (run.json does not record the target file): target saliency view skipped."
            + (
                f" Another run of this report used {hint}; pass --targets {hint} if it is this run's too."
                if hint
                else ""
            )
        )
    elif not Path(targets).exists():
        view.notes.append(f"target file {targets} not found: target saliency view skipped.")
    else:
        recs = load_records(targets, skip_invalid=True)[: cfg.n_targets]
        for rec in recs:
            seq = renderer(rec)
            batch = collate([seq], device, pad)
            alpha, _ = token_saliency(lm.model, batch, fc.layers, fc.row_weight, fc.col_weight)
            a = alpha[0].float().cpu().numpy()
            active = (seq.scope_mask & ~seq.special_mask).tolist()
            notes = [
                "" if act else ("special token: not fingerprinted" if sp else "out of scope: not fingerprinted")
                for act, sp in zip(active, seq.special_mask.tolist(), strict=True)
            ]
            view.targets.append(
                _cut(
                    TokenRow(
                        title=f"target {rec.id}",
                        tokens=_tok_strings(tok, seq.input_ids),
                        token_ids=seq.input_ids.tolist(),
                        values=a.tolist(),
                        active=active,
                        notes=notes,
                        header={"tokens": len(seq)},
                        template=_template_mask(content_renderer, rec, seq),
                    ),
                    cfg.max_tokens,
                )
            )

    # -- candidates: s_j (Eq. 10/12) ---------------------------------------------------------
    try:
        scorer = Scorer(
            lm.model,
            fp,
            penalty=sc.penalty,
            mean_weight=sc.mean_weight,
            max_weight=sc.max_weight,
            coverage_weight=sc.coverage_weight,
        )
    except ValueError as exc:
        view.notes.append(f"{run.label}: {exc}: candidate view skipped.")
        return view
    fp_ids = fp.token_ids
    o = run.order()
    finite = o[np.isfinite(run.score[o])]
    picks = [("top", k + 1, int(i)) for k, i in enumerate(finite[: cfg.n_examples])]
    picks += [("bottom", len(finite) - k, int(i)) for k, i in enumerate(finite[::-1][: cfg.n_examples])]
    missing = 0
    for which, position, row in picks:
        pidx = int(run.index[row])
        rec = pool.records.get(pidx)
        if rec is None:
            missing += 1
            continue
        seq = renderer(rec)
        batch = collate([seq], device, pad)
        ex = explain(scorer, batch)
        s, scored, unseen, rows_fp, recomputed = ex.s, ex.scored, ex.unseen, ex.fingerprint_row, ex.score
        notes = []
        for j in range(len(seq)):
            if not scored[j]:
                notes.append(
                    "special token: not scored"
                    if seq.special_mask[j]
                    else ("out of scope: not scored" if not seq.scope_mask[j] else "unseen class: not scored")
                )
            elif unseen[j]:
                sur = int(fp_ids[rows_fp[j]])
                notes.append(f"unseen class → nearest fingerprint {tok.decode([sur])!r} (id {sur}), λ={sc.penalty}")
            else:
                notes.append("")
        cols = run.columns
        header = {"rank": position, "score": float(run.score[row])}
        for k in ("mean", "max", "coverage", "n_scored", "n_unseen", "n_tokens"):
            if k in cols:
                header[k] = float(cols[k][row]) if cols[k].dtype.kind == "f" else int(cols[k][row])
        if np.isfinite(recomputed) and not sc.idf and abs(recomputed - header["score"]) > 1e-3:
            header["recomputed_score"] = recomputed
        tpl = _template_mask(content_renderer, rec, seq)
        if tpl:
            t = np.asarray(tpl, dtype=bool)
            for name, part in (("content", scored & ~t), ("template", scored & t)):
                header[f"mean s_j {name}"] = float(s[part].mean()) if part.any() else float("nan")
                header[f"n {name}"] = int(part.sum())
        tr = TokenRow(
            title=f"{which} #{header['rank']}: {run.ids[row]}",
            tokens=_tok_strings(tok, seq.input_ids),
            token_ids=seq.input_ids.tolist(),
            values=s.tolist(),
            active=scored.tolist(),
            notes=notes,
            header=header,
            template=tpl,
        )
        (view.top if which == "top" else view.bottom).append(_cut(tr, cfg.max_tokens))
    if missing:
        view.notes.append(f"{missing} candidate(s) could not be read back from the pool file: not shown.")
    return view
