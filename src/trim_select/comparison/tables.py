"""``compare.json`` task entries and ``compare.md``: per-method means and paired intervals.

A method's value of a metric is the mean over test rows of its per-row values, seeds averaged per
row first (:func:`trim_select.evaluation.stats.seed_averaged`). Every pair of methods is compared
on the same rows with the 95% paired bootstrap of :mod:`trim_select.evaluation.stats`, over the
seeds every method compared has finished (a partial run says which); ``base`` (the untuned model,
no seed) is paired with every method. For ``answer_nll`` lower is better, so ``a - b < 0`` with an
interval below 0 means ``a`` is significantly better; for ``correct`` it is the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

from ..evaluation.controls import method_of, shuffled_label
from ..evaluation.stats import BootstrapConfig, pairwise, seed_averaged

PAIRED_METRICS: tuple[str, ...] = ("answer_nll", "correct", "lm_eval_correct")
BASE = "base"
KEY_SOURCE: dict[str, str] = {"gsm": "cot"}  # the pool source that is in-domain for a task


def seeds_of(rows: Sequence[Mapping[str, Any]]) -> dict[str, set[Any]]:
    """``{method: seeds it has rows for}`` (``base``, seedless, excluded)."""
    seeds: dict[str, set[Any]] = {}
    for r in rows:
        if r["method"] != BASE:
            seeds.setdefault(r["method"], set()).add(r["seed"])
    return seeds


def common_seeds(rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Seeds finished by every method that has any (``base`` excluded)."""
    seeds = seeds_of(rows)
    return sorted(set.intersection(*seeds.values())) if seeds else []


def paired(rows: Sequence[Mapping[str, Any]], config: BootstrapConfig | None = None) -> dict[str, Any]:
    """Every pair of methods on every metric the rows carry, each pair over the seeds *both* finished
    (``seeds`` per pair; ``base`` pairs with all of the other's), so a method with more seeds is not cut
    back to the slowest method's. ``seeds`` at the top: those every method finished."""
    config = config if config is not None else BootstrapConfig()
    have_seeds = seeds_of(rows)
    out: dict[str, Any] = {"seeds": common_seeds(rows), "pairs": {}}
    for metric in PAIRED_METRICS:
        have = [r for r in rows if r.get(metric) is not None]
        by_method: dict[str, list[Mapping[str, Any]]] = {}
        for r in have:
            by_method.setdefault(str(r["method"]), []).append(r)
        if len(by_method) < 2:
            continue
        results = []
        for a, b in combinations(sorted(by_method), 2):
            both = [have_seeds[m] for m in (a, b) if m in have_seeds]
            seeds = set.intersection(*both) if both else set()
            use = [r for m in (a, b) for r in by_method[m] if r["method"] == BASE or r["seed"] in seeds]
            if {str(r["method"]) for r in use} != {a, b}:
                continue  # the two share no seed
            results += [{**res, "seeds": sorted(seeds)} for res in pairwise(use, metric, config)]
        out["pairs"][metric] = results
    return out


def method_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """``{method: {metric: mean over rows of the seed-averaged value}}`` (all seeds a method has)."""
    out: dict[str, dict[str, float | None]] = {}
    for metric in PAIRED_METRICS:
        have = [r for r in rows if r.get(metric) is not None]
        if not have:
            continue
        for method, by_id in seed_averaged(have, metric).items():
            out.setdefault(method, {})[metric] = float(np.mean(list(by_id.values())))
    return out


def _num(x: Any, digits: int = 0, scale: float = 1.0) -> str:
    return "–" if x is None else f"{x * scale:,.{digits}f}"


def _mix(shares: Mapping[str, float], key: str | None) -> str:
    if not shares:
        return "–"
    if key is not None:
        return f"{100 * shares.get(key, 0.0):.0f}% {key}"
    top = max(shares, key=lambda s: (shares[s], s))
    return f"{100 * shares[top]:.0f}% {top}"


def task_markdown(name: str, t: Mapping[str, Any]) -> list[str]:
    """One task: the method table, then the paired differences."""
    key = KEY_SOURCE.get(name)
    lm = f"; accuracy by lm-eval on the first {t['n_lm_eval']} of them" if t.get("n_lm_eval") else ""
    lines = ["", f"## {name}", "",
             f"Answer NLL and {'accuracy' if t['kind'] == 'mc' else 'exact match'} on {t['n_nll']} of "
             f"{t['n_test']} test rows ({t['shots']}-shot){lm}. Seeds finished by every method: "
             f"{t['paired']['seeds']}; each pair below is over the seeds both of its methods finished.", "",
             "| method | seeds | train rows | train tokens | answer NLL | acc % | lm-eval % | "
             f"{'in-domain' if key else 'top source'} | mean tokens | select s |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    means = t["means"]
    for label, m in t["methods"].items():
        v = means.get(label, {})
        lines.append(f"| {label} | {len(m['seeds_done'])} | {_num(m['train']['rows'])} | "
                     f"{_num(m['train']['tokens'])} | {_num(v.get('answer_nll'), 4)} | "
                     f"{_num(v.get('correct'), 1, 100)} | {_num(v.get('lm_eval_correct'), 1, 100)} | "
                     f"{_mix(m['profile']['sources'], key)} | {_num(m['profile']['mean_tokens'])} | "
                     f"{_num(m['cost'].get('seconds'), 0)} |")
    if BASE in means:
        v = means[BASE]
        lines.append(f"| base (untuned) | – | – | – | {_num(v.get('answer_nll'), 4)} | "
                     f"{_num(v.get('correct'), 1, 100)} | {_num(v.get('lm_eval_correct'), 1, 100)} | – | – | – |")
    for metric, pairs in t["paired"]["pairs"].items():
        better = "a better when < 0" if metric == "answer_nll" else "a better when > 0"
        lines += ["", f"Paired differences, {metric} ({better}; `*`: the 95% interval over test rows excludes 0; "
                  "per seed: the mean difference of each seed alone, whose spread the interval does not "
                  "include):", "",
                  "| a | b | seeds | mean(a - b) | 95% CI | rows | | per seed | seeds agree |",
                  "|---|---|---|---:|---|---:|---|---|---|"]
        scale = 1.0 if metric == "answer_nll" else 100.0
        for r in pairs:
            per_seed = per_seed_gaps(r, scale)
            agree = "–" if len(r.get("per_seed", {})) < 2 else ("yes" if r["seeds_agree"] else "no")
            seeds = ",".join(str(x) for x in r.get("seeds", [])) or "–"
            lines.append(f"| {r['a']} | {r['b']} | {seeds} | {r['mean_diff'] * scale:+.4f} | "
                         f"[{r['low'] * scale:+.4f}, {r['high'] * scale:+.4f}] | {r['n']} | "
                         f"{'*' if r['excludes_zero'] else ''} | {per_seed} | {agree} |")
    return lines + order_floor(t)


def per_seed_gaps(pair: Mapping[str, Any], scale: float = 1.0) -> str:
    """A pair's mean difference of each seed alone, e.g. ``+0.0008, -0.0002`` (``–`` when none)."""
    return ", ".join(f"{v * scale:+.4f}" for v in pair.get("per_seed", {}).values()) or "–"


def order_floor(t: Mapping[str, Any]) -> list[str]:
    """The A/A line of ``--order-control``: a method against its own rows in another order. Each seed's
    gap is shown beside the interval, which sees only the test rows, not the training noise."""
    lines = []
    for label in [lb for lb in t["methods"] if lb == shuffled_label(method_of(lb))]:
        for r in t["paired"]["pairs"].get("answer_nll", []):
            if {r["a"], r["b"]} == {label, method_of(label)}:
                lines += ["", f"Order noise floor (A/A): `{r['a']}` − `{r['b']}` answer NLL {r['mean_diff']:+.4f} "
                          f"[{r['low']:+.4f}, {r['high']:+.4f}] over seeds {r.get('seeds', [])}, per seed "
                          f"{per_seed_gaps(r)}: the same rows in another order; gaps between methods of this "
                          "size (per seed as well) are the training order, not the choice."]
    return lines


def compare_markdown(summary: Mapping[str, Any]) -> str:
    """``compare.md``: the run's size and settings, then one section per task."""
    r = summary["recipe"]
    lines = ["# Method comparison", "",
             f"Pool `{summary['pool']['path']}` ({summary['pool_profile']['rows']} rows, mean "
             f"{summary['pool_profile']['mean_tokens']:.0f} tokens), budget {summary['budget']}, base model "
             f"`{summary['model']}`, seeds {summary['seeds']}, methods {', '.join(summary['labels'])}. "
             "Fine-tuning recipe (every method): "
             + ", ".join(f"{k}={r[k]}" for k in ("epochs", "lr", "batch_size", "lora_r", "lora_alpha") if k in r)
             + f". Controls: {summary['controls']}. Git {summary.get('git') or '–'}, machine "
               f"{summary.get('machine') or '–'}. {'Complete.' if summary.get('complete') else 'PARTIAL run.'}"]
    for name, t in summary["tasks"].items():
        lines += task_markdown(name, t)
    return "\n".join(lines) + "\n"
