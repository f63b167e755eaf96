"""A deliberately naive TRIM: one example at a time, float64, Python loops over tokens.

It shares no code with the package's math; it reads the model's own eager attentions
(``output_attentions=True``, all layers) and follows SPEC.md line by line.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch


def float64_eager(model):
    m = copy.deepcopy(model).to(torch.float64)
    m.set_attn_implementation("eager")
    return m.eval()


def saliency(model64, ids, special, layers, wq=0.5, wk=0.5, hidden_layer=-1):
    """alpha_i and h_i (float64) for one unpadded sequence; h from ``hidden_states[hidden_layer]``."""
    with torch.no_grad():
        out = model64(input_ids=torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    attns = out.attentions[-layers:]
    T = len(ids)
    Q = [0.0] * T
    K = [0.0] * T
    n_terms = 0
    for A_l in attns:
        for h in range(A_l.shape[1]):
            A = A_l[0, h].tolist()
            n_terms += 1
            for i in range(T):
                n_i = i + 1  # causal: keys 0..i visible
                if n_i < 2:
                    q = 0.0
                else:
                    H = -sum(A[i][j] * math.log(A[i][j] + 1e-8) for j in range(n_i))
                    q = 1.0 - H / math.log(n_i)
                Q[i] += q
            for j in range(T):
                m_j = T - j  # queries j..T-1 see key j
                K[j] += sum(A[i][j] for i in range(j, T)) / m_j
    Q = [x / n_terms for x in Q]
    K = [x / n_terms for x in K]
    norm = [K[j] for j in range(T) if not special[j]]
    lo, hi = min(norm), max(norm)
    alpha = [wq * Q[i] + wk * (K[i] - lo) / (hi - lo + 1e-8) for i in range(T)]
    hidden = out.hidden_states[hidden_layer][0].numpy()
    return alpha, hidden


def fingerprints(model64, seqs, layers, hidden_layer=-1):
    sums = {}
    for ids, scope, special in seqs:
        alpha, hidden = saliency(model64, ids, special, layers, hidden_layer=hidden_layer)
        for i, t in enumerate(ids):
            if scope[i] and not special[i]:
                h = hidden[i] / np.linalg.norm(hidden[i])
                sums[t] = sums.get(t, 0.0) + alpha[i] * h
    fp = {}
    for t, v in sums.items():
        n = np.linalg.norm(v)
        if n >= 1e-12:
            fp[t] = v / n
    return fp


def scores(model64, seqs, fp, penalty=1.0, wmu=0.5, wm=0.5, eta=0.05, hidden_layer=-1):
    emb = model64.get_input_embeddings().weight.detach().numpy()
    keys = sorted(fp)
    out = []
    for ids, scope, special in seqs:
        with torch.no_grad():
            fwd = model64(input_ids=torch.tensor([ids]), output_hidden_states=True)
            hidden = fwd.hidden_states[hidden_layer][0].numpy()
        s = []
        for j, t in enumerate(ids):
            if not scope[j] or special[j]:
                continue
            h = hidden[j] / np.linalg.norm(hidden[j])
            if t in fp:
                s.append(float(h @ fp[t]))
            elif penalty is not None:
                e = emb[t] / np.linalg.norm(emb[t])
                best, best_t = -2.0, None
                for u in keys:  # ascending: ties keep the smallest id
                    c = float(e @ (emb[u] / np.linalg.norm(emb[u])))
                    if c > best:
                        best, best_t = c, u
                s.append(penalty * float(h @ fp[best_t]))
        if not s:
            out.append(float("-inf"))
        else:
            out.append(wmu * sum(s) / len(s) + wm * max(s) + eta * len(s) / len(ids))
    return np.array(out)
