"""Seeded random projections of long gradient vectors, with memory bounded by a block size.

``project(G)`` maps rows of ``G`` (``[B, P]``, ``P`` = number of LoRA parameters) to ``[B, k]``.
The projection is a fixed matrix determined by ``(seed, kind, P, k)`` alone: it never depends on
how examples are grouped or how parameters are split into blocks, so pool and target features
always live in the same space.

- ``rademacher`` (LESS / TRAK's default): ``R[i, j] = +-1`` i.i.d.; ``gaussian``: ``N(0, 1)``.
  The matrix is never stored: its rows come in fixed tiles of ``TILE_ROWS`` (tile ``b`` = rows
  ``[b*TILE_ROWS, (b+1)*TILE_ROWS)``), each regenerated per call from a generator seeded with
  ``(seed, b + 1)``; memory stays at one tile (``TILE_ROWS * k`` floats). Cost ``O(P * k)`` per
  call: cheap on a GPU; on a CPU the generation dominates for large ``P`` (~0.75 s per 2^27
  entries on 2 cores).
- ``sjlt``: a sparse Johnson-Lindenstrauss transform (CountSketch: each coordinate goes to one
  seeded bucket with a seeded sign). Cost ``O(P)`` per example, the practical choice on a CPU.

``auto`` picks ``rademacher`` on CUDA, and on a CPU when ``P * k`` is at most ``2**31``
(e.g. small models or small LoRA ranks), else ``sjlt``. Scale factors are irrelevant downstream
(features are L2-normalised) and are omitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KINDS: tuple[str, ...] = ("auto", "rademacher", "gaussian", "sjlt")
DENSE_CPU_LIMIT = 2**31
TILE_ROWS = 1024


def resolve_kind(kind: str, n_params: int, dim: int, device: torch.device) -> str:
    if kind not in KINDS:
        raise ValueError(f"projection must be one of {KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    if device.type == "cuda" or n_params * dim <= DENSE_CPU_LIMIT:
        return "rademacher"
    return "sjlt"


def _generator(seed: int, block: int, device: torch.device) -> torch.Generator:
    state = np.random.SeedSequence([seed, block]).generate_state(1, dtype=np.uint64)[0]
    g = torch.Generator(device=device)
    g.manual_seed(int(state) & ((1 << 63) - 1))
    return g


@dataclass
class Projector:
    """``project(G: [B, P]) -> [B, k]`` with a seeded, fixed random matrix (see module doc)."""

    n_params: int
    dim: int
    kind: str = "rademacher"
    seed: int = 0
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        self.kind = resolve_kind(self.kind, self.n_params, self.dim, self.device)
        if self.dim < 1 or self.n_params < 1:
            raise ValueError("projection dimension and parameter count must be positive")
        self._bucket: torch.Tensor | None = None
        self._sign: torch.Tensor | None = None
        if self.kind == "sjlt":
            g = _generator(self.seed, 0, self.device)
            self._bucket = torch.randint(0, self.dim, (self.n_params,), generator=g, device=self.device)
            self._sign = torch.randint(0, 2, (self.n_params,), generator=g, device=self.device,
                                       dtype=torch.int8).float().mul_(2).sub_(1)

    def _dense_block(self, b: int, rows: int) -> torch.Tensor:
        g = _generator(self.seed, b + 1, self.device)
        if self.kind == "gaussian":
            return torch.randn(rows, self.dim, generator=g, device=self.device)
        words = -(-self.dim // 64)  # 64 random bits per int64, unpacked to +-1
        bits = torch.randint(-(2**63), 2**63 - 1, (rows, words), generator=g, device=self.device,
                             dtype=torch.int64).view(torch.uint8)
        shifts = torch.arange(8, dtype=torch.uint8, device=self.device)
        signs = ((bits.unsqueeze(-1) >> shifts) & 1).view(rows, words * 64)[:, :self.dim]
        return signs.float().mul_(2).sub_(1)

    @torch.no_grad()
    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """``grads @ R`` for a ``[B, P]`` float tensor; returns ``[B, k]`` float32."""
        if grads.ndim != 2 or grads.shape[1] != self.n_params:
            raise ValueError(f"expected [B, {self.n_params}] gradients, got {tuple(grads.shape)}")
        grads = grads.to(self.device, torch.float32)
        out = torch.zeros(grads.shape[0], self.dim, device=self.device)
        if self.kind == "sjlt":
            for i in range(grads.shape[0]):  # per row: one [P] temporary
                out[i].index_add_(0, self._bucket, grads[i] * self._sign)
            return out
        for b, start in enumerate(range(0, self.n_params, TILE_ROWS)):
            stop = min(start + TILE_ROWS, self.n_params)
            out.addmm_(grads[:, start:stop], self._dense_block(b, stop - start))
        return out
