"""Stage II: token matching and the robust sample score (Eq. 10-15).

For each in-scope, non-special token ``j`` of a candidate ``c``::

    s_j = cos(h^_j, f_{t_j})                       seen class          (Eq. 10)
    s_j = lambda * cos(h^_j, f_{t_bar_j})          unseen class        (Eq. 11-12)
    S(c) = w_mu mean_j s_j + w_m max_j s_j + eta |M(c)| / |c|          (Eq. 13, 15)

Extensions (docs/SPEC.md "Extensions"): ``h^`` from an intermediate ``hidden_layer``
(:mod:`.layers`), and the generic correction ``S(c) = S_T(c) - S_G(c)``, the score against the
targets minus the score against a generic target set of seeded random pool rows
(:mod:`.generic`), both from the same forward of each batch.

Everything is vectorised: a vocabulary-sized table maps a token id to its fingerprint row and
weight (computed once, :class:`TokenMatcher`), so a batch costs one base-model forward (no LM head,
no attentions), a gather, a row-wise dot product and masked segment reductions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch

from .batching import collate, padding_mask_free, plan_batches, run_with_backoff
from .config import RuntimeConfig, ScoreConfig
from .data import TokenSequence, as_sequence
from .fingerprints import Fingerprints, nearest_rows
from .layers import check_hidden_layer, hidden_at, select_hidden
from .models import base_model, embedding_matrix, model_pad_id

# the defaults of every signature below, read from the config dataclasses (each default written once)
SCORE, RUNTIME = ScoreConfig(), RuntimeConfig()


class TokenMatcher:
    """Vocabulary-sized lookup: token id -> fingerprint row, weight (1, lambda or 0), unseen flag.

    Unseen classes map to the nearest fingerprinted class by cosine of unit input embeddings
    (Eq. 11; ties to the smallest token id), computed with a chunked matmul.
    """

    def __init__(self, fp: Fingerprints, embeddings: torch.Tensor, penalty: float | None = SCORE.penalty,
                 device: torch.device | str | None = None, chunk: int = 8192,
                 idf: np.ndarray | None = None):
        device = torch.device(device) if device is not None else embeddings.device
        vocab = embeddings.shape[0]
        ids = torch.as_tensor(fp.token_ids, dtype=torch.long)
        if len(ids) and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            raise ValueError(f"fingerprint token ids exceed the model's vocabulary ({vocab}): wrong model?")
        self.vectors = torch.as_tensor(fp.vectors, dtype=torch.float32, device=device)
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[ids] = True
        if penalty is None:  # unseen tokens are not scored: no map needed
            row = torch.zeros(vocab, dtype=torch.long)
            row[ids] = torch.arange(len(ids))
        elif fp.nearest is not None:  # computed once, with the fingerprints (Stage I)
            if len(fp.nearest) != vocab:
                raise ValueError(f"the fingerprints' unseen-token map covers {len(fp.nearest)} token ids but the "
                                 f"model's vocabulary has {vocab}: they were built with another model")
            row = torch.as_tensor(fp.nearest, dtype=torch.long)
        else:
            row = torch.as_tensor(nearest_rows(fp.token_ids, embeddings.to(device), chunk=chunk))
        weight = torch.zeros(vocab, dtype=torch.float32)
        weight[seen] = 1.0
        if penalty is not None:
            weight[~seen] = float(penalty)
        self.row = row.to(device)
        self.weight = weight.to(device)
        self.scored = (seen | (penalty is not None)).to(device) if len(ids) else torch.zeros(
            vocab, dtype=torch.bool, device=device)
        self.unseen = (~seen).to(device)
        self.idf = None if idf is None else torch.as_tensor(idf, dtype=torch.float32, device=device)
        self.vocab = vocab

    @torch.no_grad()
    def token_scores(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``s_j`` for every position (Eq. 10/12), ``[B, T]``; meaningless where not scored."""
        h_hat = torch.nn.functional.normalize(hidden.float(), dim=-1)
        f = self.vectors[self.row[input_ids]]  # [B, T, d]
        return torch.einsum("btd,btd->bt", h_hat, f) * self.weight[input_ids]


@dataclass
class ScoreDetails:
    """Per-example results aligned with the pool (NumPy arrays)."""

    score: np.ndarray
    mean: np.ndarray
    max: np.ndarray
    coverage: np.ndarray
    n_tokens: np.ndarray
    n_scored: np.ndarray
    n_unseen: np.ndarray
    # with the generic correction: score = target_score - generic_score (mean/max/coverage: the targets')
    target_score: np.ndarray | None = None
    generic_score: np.ndarray | None = None

    @classmethod
    def concat(cls, parts: list[ScoreDetails]) -> ScoreDetails:
        if not parts:
            e = np.zeros(0)
            return cls(e, e, e, e, e.astype(np.int64), e.astype(np.int64), e.astype(np.int64))
        return cls(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in cls.__dataclass_fields__
                      if getattr(parts[0], k) is not None})

    def columns(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if getattr(self, k) is not None}


@torch.no_grad()
def pool_scores(
    matcher: TokenMatcher,
    batch: Mapping[str, torch.Tensor],
    hidden: torch.Tensor,
    mean_weight: float = SCORE.mean_weight,
    max_weight: float = SCORE.max_weight,
    coverage_weight: float = SCORE.coverage_weight,
) -> dict[str, torch.Tensor]:
    """Eq. 13-15 on a collated batch, given its last hidden states.

    Only the scored positions M(c) (Eq. 14) are gathered, so padding and out-of-scope tokens cost
    nothing; mean/max/count are segment reductions over the batch row of each position.
    """
    ids = batch["input_ids"]
    valid = batch["attention_mask"]
    m = valid & batch["scope_mask"] & ~batch["special_mask"] & matcher.scored[ids]  # M(c), Eq. 14
    rows, cols = m.nonzero(as_tuple=True)
    tok = ids[rows, cols]
    h_hat = torch.nn.functional.normalize(hidden[rows, cols].float(), dim=-1)
    f = matcher.vectors.index_select(0, matcher.row[tok])
    s = (h_hat * f).sum(-1) * matcher.weight[tok]  # s_j, Eq. 10 / Eq. 12
    b = ids.shape[0]
    n_scored = torch.bincount(rows, minlength=b)
    n_tokens = valid.sum(1)
    if matcher.idf is not None:  # extension: IDF-weighted mean
        w = matcher.idf[tok]
        mean = torch.zeros(b, device=s.device).index_add_(0, rows, s * w) / torch.zeros(
            b, device=s.device).index_add_(0, rows, w).clamp_min(1e-12)
    else:
        mean = torch.zeros(b, device=s.device).index_add_(0, rows, s) / n_scored.clamp_min(1)
    mx = torch.full((b,), float("-inf"), device=s.device).scatter_reduce_(0, rows, s, "amax")
    coverage = n_scored / n_tokens.clamp_min(1)
    score = mean_weight * mean + max_weight * mx + coverage_weight * coverage  # Eq. 15
    empty = n_scored == 0
    score = score.masked_fill(empty, float("-inf"))
    mean = mean.masked_fill(empty, float("nan"))
    mx = mx.masked_fill(empty, float("nan"))
    n_unseen = torch.bincount(rows[matcher.unseen[tok]], minlength=b)
    return {"score": score, "mean": mean, "max": mx, "coverage": coverage, "n_tokens": n_tokens,
            "n_scored": n_scored, "n_unseen": n_unseen}


Targets = Fingerprints | Mapping[str, Fingerprints]


def generic_corrected(target: dict[str, torch.Tensor], generic: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``S_T(c) - S_G(c)`` (SPEC "Extensions": generic correction), with both components kept; a row
    unscorable against either set (``-inf``) stays ``-inf``."""
    t, g = target["score"], generic["score"]
    both = torch.isfinite(t) & torch.isfinite(g)
    return {**target, "score": torch.where(both, t - g, torch.full_like(t, float("-inf"))), "target_score": t,
            "generic_score": g}


class Scorer:
    """Stage II over a stream of sequences: length-sorted token-budget batches, pool order out.

    ``fingerprints`` is one :class:`Fingerprints` or a mapping ``{name: Fingerprints}`` of several
    target sets (SPEC "Extensions"): every batch is forwarded once and matched against each set
    (one vocabulary-sized :class:`TokenMatcher` per target), so each target's results are exactly
    those of a single-target run on the same batches. ``mask_free=True`` drops the padding mask
    from the forward where that is exact (:func:`~trim_select.batching.padding_mask_free`).
    ``hidden_layer`` N matches the states of ``hidden_states[N]`` (fingerprints built at that layer);
    ``generic`` (fingerprints of generic pool rows) turns on the generic correction for every target.
    """

    def __init__(self, model: Any, fingerprints: Targets, *, penalty: float | None = SCORE.penalty,
                 mean_weight: float = SCORE.mean_weight, max_weight: float = SCORE.max_weight,
                 coverage_weight: float = SCORE.coverage_weight, idf: np.ndarray | None = None,
                 batch_tokens: int = RUNTIME.batch_tokens, max_batch_size: int = RUNTIME.max_batch_size,
                 pad_id: int | None = None, compile: bool = RUNTIME.compile, mask_free: bool = RUNTIME.mask_free,
                 hidden_layer: int | None = None, generic: Fingerprints | None = None):
        self.model = model
        self.base = base_model(model)
        self._forward = torch.compile(self.base, dynamic=True) if compile else self.base
        self.device = next(model.parameters()).device
        emb = embedding_matrix(model)
        self.single = isinstance(fingerprints, Fingerprints)
        targets = {"target": fingerprints} if self.single else dict(fingerprints)
        if not targets:
            raise ValueError("no target set: pass one Fingerprints or a non-empty mapping of them")
        hidden = self.base.config.hidden_size
        check_hidden_layer(self.base.config, hidden_layer)
        self.hidden_layer = hidden_layer
        for name, fp in {**targets, **({"generic": generic} if generic is not None else {})}.items():
            if fp.dim != hidden:
                raise ValueError(f"fingerprints {name!r} have dimension {fp.dim} but the model's hidden size is "
                                 f"{hidden}: they were built with another model")
            built_at = fp.meta.get("hidden_layer", hidden_layer)  # files from before the extension: the last
            if built_at != hidden_layer:
                raise ValueError(f"fingerprints {name!r} were built from hidden layer {built_at} but Stage II "
                                 f"reads hidden layer {hidden_layer} (None: the last): they would not match")
        self.matchers = {name: TokenMatcher(fp, emb, penalty, self.device, idf=idf) for name, fp in targets.items()}
        self.generic = None if generic is None else TokenMatcher(generic, emb, penalty, self.device, idf=idf)
        self.matcher = next(iter(self.matchers.values()))  # the (first) target's matcher
        self.vocab = self.matcher.vocab
        self.weights = (mean_weight, max_weight, coverage_weight)
        self.batch_tokens, self.max_batch_size = batch_tokens, max_batch_size
        self.pad_id = pad_id if pad_id is not None else model_pad_id(model)
        exact, self.mask_free_reason = padding_mask_free(self.base.config)
        self.mask_free = bool(mask_free and exact)

    @property
    def names(self) -> list[str]:
        return list(self.matchers)

    @torch.no_grad()
    def forward_hidden(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Base model only: no LM head, no attention output, no KV cache.

        Without the padding mask where :attr:`mask_free` (right padding, plain causal attention):
        every real token attends to the same keys either way, so its hidden state is the same.
        """
        mask = None if self.mask_free else batch["attention_mask"].long()
        if self.hidden_layer is not None and self._forward is self.base:  # stop at that layer
            return hidden_at(self.base, self.hidden_layer, batch["input_ids"], mask)
        out = self._forward(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False,
                            output_hidden_states=self.hidden_layer is not None)
        return select_hidden(out, self.hidden_layer)

    def _check(self, seqs: list[TokenSequence]) -> None:
        for b in seqs:
            if len(b) == 0:
                raise ValueError("an example rendered to zero tokens")
            if int(b.input_ids.max()) >= self.vocab:
                raise ValueError(f"token id {int(b.input_ids.max())} outside the model's vocabulary")

    @torch.no_grad()
    def score_sequences_many(self, seqs: list[TokenSequence], on_batch: Any = None) -> dict[str, ScoreDetails]:
        """Every target's :class:`ScoreDetails` in pool order, from one forward per batch."""
        n = len(seqs)
        out: dict[str, dict[str, np.ndarray]] = {}
        for name in self.matchers:
            cols = {k: np.zeros(n, dtype=np.float64) for k in ("score", "mean", "max", "coverage")}
            cols.update({k: np.zeros(n, dtype=np.int64) for k in ("n_tokens", "n_scored", "n_unseen")})
            if self.generic is not None:
                cols.update({k: np.zeros(n, dtype=np.float64) for k in ("target_score", "generic_score")})
            out[name] = cols
        self._check(seqs)

        def run(idx: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
            batch = collate([seqs[i] for i in idx], self.device, self.pad_id)
            hidden = self.forward_hidden(batch)
            res = {name: pool_scores(m, batch, hidden, *self.weights) for name, m in self.matchers.items()}
            if self.generic is not None:
                g = pool_scores(self.generic, batch, hidden, *self.weights)
                res = {name: generic_corrected(r, g) for name, r in res.items()}
            return {name: {k: v.cpu().numpy() for k, v in r.items()} for name, r in res.items()}

        if n:
            for idx in plan_batches([len(s) for s in seqs], self.batch_tokens, self.max_batch_size):
                for sub, res in run_with_backoff(idx, run):
                    for name, cols in res.items():
                        for k, v in cols.items():
                            out[name][k][sub] = v
                if on_batch is not None:
                    on_batch(len(idx))
        return {name: ScoreDetails(**cols) for name, cols in out.items()}

    def score_sequences(self, seqs: list[TokenSequence], on_batch: Any = None) -> ScoreDetails:
        """Score sequences in pool order; ``on_batch(n_done)`` is called after each forward batch."""
        if len(self.matchers) != 1:
            raise ValueError(f"{len(self.matchers)} target sets: use score_sequences_many")
        return self.score_sequences_many(seqs, on_batch)[self.names[0]]

    def iter_chunks_many(self, pool: Iterable[Mapping[str, Any] | TokenSequence],
                         chunk_size: int = RUNTIME.chunk_size
                         ) -> Iterator[dict[str, ScoreDetails]]:
        it = iter(pool)
        while chunk := list(islice(it, chunk_size)):
            yield self.score_sequences_many([as_sequence(x) for x in chunk])

    def iter_chunks(self, pool: Iterable[Mapping[str, Any] | TokenSequence],
                    chunk_size: int = RUNTIME.chunk_size
                    ) -> Iterator[ScoreDetails]:
        it = iter(pool)
        while chunk := list(islice(it, chunk_size)):
            yield self.score_sequences([as_sequence(x) for x in chunk])


def score_details_many(
    model: Any,
    pool: Iterable[Mapping[str, Any] | TokenSequence],
    targets: Mapping[str, Fingerprints],
    penalty: float | None = SCORE.penalty,
    mean_weight: float = SCORE.mean_weight,
    max_weight: float = SCORE.max_weight,
    coverage_weight: float = SCORE.coverage_weight,
    *,
    idf: np.ndarray | None = None,
    batch_tokens: int = RUNTIME.batch_tokens,
    max_batch_size: int = RUNTIME.max_batch_size,
    chunk_size: int = RUNTIME.chunk_size,
    mask_free: bool = RUNTIME.mask_free,
) -> dict[str, ScoreDetails]:
    """Stage II for several target sets from one pool pass: ``{name: ScoreDetails}``, each equal to
    :func:`score_details` with that target alone (Eq. 10-15 per target, one forward per batch)."""
    scorer = Scorer(model, targets, penalty=penalty, mean_weight=mean_weight, max_weight=max_weight,
                    coverage_weight=coverage_weight, idf=idf, batch_tokens=batch_tokens,
                    max_batch_size=max_batch_size, mask_free=mask_free)
    parts: dict[str, list[ScoreDetails]] = {name: [] for name in scorer.names}
    for chunk in scorer.iter_chunks_many(pool, chunk_size):
        for name, det in chunk.items():
            parts[name].append(det)
    return {name: ScoreDetails.concat(p) for name, p in parts.items()}


def score_details(model: Any, pool: Iterable[Mapping[str, Any] | TokenSequence], fp: Fingerprints,
                  *args: Any, **kw: Any) -> ScoreDetails:
    """Stage II with every per-example component (mean, max, coverage, counts); the arguments after
    ``fp`` (positional or by name) and their defaults are :func:`score_details_many`'s."""
    return score_details_many(model, pool, {"target": fp}, *args, **kw)["target"]


def score(model: Any, pool: Iterable[Mapping[str, Any] | TokenSequence], fp: Fingerprints,
          *args: Any, **kw: Any) -> np.ndarray:
    """Stage II: ``S(c)`` (Eq. 15) for every pool example, a NumPy array aligned with ``pool``; the
    arguments after ``fp`` are :func:`score_details_many`'s."""
    return score_details(model, pool, fp, *args, **kw).score


def token_idf(sequences: Iterable[Mapping[str, Any] | TokenSequence], vocab: int) -> np.ndarray:
    """Extension (SPEC "Extensions"): smoothed IDF of each token id over the pool's in-scope tokens,
    ``log((1 + N) / (1 + df_t)) + 1``."""
    df = np.zeros(vocab, dtype=np.int64)
    n = 0
    for item in sequences:
        s = as_sequence(item)
        ids = np.unique(s.input_ids[s.scope_mask & ~s.special_mask])
        df[ids] += 1
        n += 1
    return (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)


@dataclass(frozen=True)
class TokenExplanation:
    """Stage II term by term for one sequence (row 0 of a batch): why it got its score."""

    s: np.ndarray  # s_j of every position (Eq. 10; unseen classes scaled by lambda, Eq. 12)
    scored: np.ndarray  # bool: the positions in M(c) (in scope, not special, a class with a fingerprint)
    unseen: np.ndarray  # bool: the token's class has no fingerprint of its own
    fingerprint_row: np.ndarray  # the fingerprint row each token matched (its class, or the nearest: Eq. 11)
    score: float  # S(c) recomputed from these terms (Eq. 15)


def explain(scorer: Scorer, batch: Mapping[str, torch.Tensor]) -> TokenExplanation:
    """The per-token terms behind the score of ``batch``'s first sequence (the report's token view)."""
    m = scorer.matcher
    hidden = scorer.forward_hidden(batch)
    s = m.token_scores(hidden, batch["input_ids"])[0].float().cpu().numpy()
    ids = batch["input_ids"][0]
    scored = (batch["scope_mask"][0] & ~batch["special_mask"][0] & m.scored[ids]).cpu().numpy()
    with torch.no_grad():
        recomputed = pool_scores(m, batch, hidden, *scorer.weights)
        if scorer.generic is not None:
            recomputed = generic_corrected(recomputed, pool_scores(scorer.generic, batch, hidden, *scorer.weights))
    return TokenExplanation(s=s, scored=scored, unseen=m.unseen[ids].cpu().numpy(),
                            fingerprint_row=m.row[ids].cpu().numpy(), score=float(recomputed["score"][0]))
