"""Engine ``local``: one process per visible GPU (or ``workers`` CPU processes, torch threads split);
worker ``i`` of ``n`` runs :meth:`TrimSelector.score_pool` with ``shard=(i, n)`` (``docs/SPEC.md``
"Engines"). Workers are spawned, read the fingerprints from ``OUT`` and write parts through
:class:`~trim_select.io.ScoreWriter`; a rerun scores only the chunks without a part."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from ..config import FingerprintConfig, RenderConfig, RuntimeConfig, ScoreConfig
from ..io import digest_entry, remember_digest
from ..progress import count_rows, progress_bar
from ..selector import TrimSelector
from .base import FP_FILE, ShardPlan, config_from_dict
from .faults import FaultInjector
from .multi import score_pool_many


def local_devices(runtime: RuntimeConfig, workers: int | None) -> list[str]:
    """The device of each local worker: every visible GPU (round-robin if ``workers`` exceeds
    them), or ``workers`` CPU processes."""
    want_gpu = runtime.device in ("auto", "cuda") and torch.cuda.is_available()
    if runtime.device.startswith("cuda:"):
        return [runtime.device] * (workers or 1)
    if want_gpu:
        n_gpu = torch.cuda.device_count()
        return [f"cuda:{i % n_gpu}" for i in range(workers or n_gpu)]
    return ["cpu"] * (workers or 1)


def _local_worker(spec: dict[str, Any]) -> None:
    """Entry point of a spawned local worker: score chunks ``k % n == i`` into ``OUT/parts``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["device"].startswith("cuda"):
        torch.cuda.set_device(torch.device(spec["device"]))
    remember_digest(spec["pool_digest"])  # the driver's hash, reused while the pool's stat is unchanged
    fault = FaultInjector(**spec["fault"])  # test hook: die after writing N parts, as a killed worker would
    render, fpc, scoring, runtime = (config_from_dict(c, spec[k]) for c, k in (
        (RenderConfig, "render"), (FingerprintConfig, "fingerprint"), (ScoreConfig, "scoring"),
        (RuntimeConfig, "runtime")))
    sel = TrimSelector(spec["model"], render=render, fingerprint=fpc, scoring=scoring,
                       runtime=replace(runtime, device=spec["device"]), progress=False)
    io = {"format": spec["format"], "skip_invalid": spec["skip_invalid"], "shard": tuple(spec["shard"]),
          "on_part": lambda _k: fault.part_written()}
    if spec["targets"] is None:
        sel.load_fingerprints(Path(spec["out"]) / FP_FILE)
        sel.score_pool(spec["pool"], spec["out"], **io)
        return
    dirs = {name: Path(spec["out"]) / name for name in spec["targets"]}
    fps = {name: sel.load_fingerprints(d / FP_FILE).fingerprints for name, d in dirs.items()}
    score_pool_many(sel, spec["pool"], dirs, fps, **io)


def score_local(plan: ShardPlan, out_dir: str | Path, *, workers: int | None = None, progress: bool = True,
                targets: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the local engine to completion; raises naming the workers that failed (rerun resumes).
    ``targets``: the names of several target sets, scored in one pass into ``OUT/<name>/``."""
    out_dir = Path(out_dir)
    dirs = [out_dir] if targets is None else [out_dir / name for name in targets]
    render, fpc, scoring, runtime = plan.configs()
    devices = local_devices(runtime, workers)
    n = len(devices)
    threads = max(1, len(os.sched_getaffinity(0)) // n) if devices[0] == "cpu" else 0
    pool_digest = digest_entry(plan.pool)  # hashed once here, not once per worker
    ctx = mp.get_context("spawn")
    procs = []
    t0 = time.perf_counter()
    for i, dev in enumerate(devices):
        spec = {"model": plan.model_spec, "render": plan.render, "fingerprint": plan.fingerprint,
                "scoring": plan.scoring, "runtime": plan.runtime, "targets": None if targets is None else list(targets),
                "pool": plan.pool, "out": str(out_dir.resolve()), "format": plan.format,
                "skip_invalid": plan.skip_invalid, "shard": [i, n], "device": dev, "threads": threads,
                "fault": FaultInjector.settings(), "pool_digest": pool_digest}
        p = ctx.Process(target=_local_worker, args=(spec,), name=f"trim-select-worker-{i}", daemon=False)
        p.start()
        procs.append(p)
    total = approx_chunks(plan)
    bar = progress_bar(total, f"Stage II scoring ({n} workers, chunks)", progress)
    done = count_parts(dirs)
    bar.update(done)
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=1.0 / len(procs))
            now = count_parts(dirs)
            bar.update(now - done)
            done = now
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    finally:
        bar.close()
    failed = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        what = ", ".join(f"worker {i}/{n} (exit code {code})" for i, code in failed)
        raise RuntimeError(f"{what} stopped before finishing; the chunks they completed are kept in "
                           f"{out_dir / 'parts'}: rerun the same command to score only the rest")
    return {"engine": "local", "workers": n, "devices": devices, "threads_per_worker": threads,
            "scoring_s": round(time.perf_counter() - t0, 3)}


def approx_chunks(plan: ShardPlan) -> int | None:
    rows = count_rows(plan.pool)
    return None if rows is None else math.ceil(rows / plan.chunk_size)


def count_parts(dirs: Sequence[Path]) -> int:
    """Chunks with a part in every folder of ``dirs``."""
    return min(sum(1 for _ in (d / "parts").glob("part-*.parquet")) for d in dirs)
