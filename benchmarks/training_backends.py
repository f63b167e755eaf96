"""Our LoRA loop (training/lora.py) vs TRL's SFTTrainer (training/trl_sft.py) on the same fine-tune.

One process, runs alternated (ours, trl, ours, trl, ...) so that a machine shared with other jobs
loads both alike: seconds per run, the TRL/ours ratio, final train loss, and the largest difference
between the two final adapters (the TRL path is built to reproduce our loop's trajectory).

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/training_backends.py --rows 40 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from trim_select.data import load_records
from trim_select.evaluation.runner import evaluation_recipe
from trim_select.models import resolve_model_path
from trim_select.training.lora import train_lora
from trim_select.training.trl_sft import train_lora_trl

BENCH = next((p / "shared" / "bench" for p in Path(__file__).resolve().parents if (p / "shared" / "bench").is_dir()),
             Path("/work/shared/bench"))
POOL = BENCH / "pool-small.jsonl"
BACKENDS = {"ours": train_lora, "trl": train_lora_trl}


def adapter_gap(a: Path, b: Path) -> float:
    """Largest absolute difference between two adapter files (same keys required)."""
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if x.keys() != y.keys():
        raise ValueError(f"adapters {a} and {b} hold different parameters")
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=Path, default=POOL)
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeats", type=int, default=2, help="runs per backend (alternated)")
    ap.add_argument("--seed", type=int, default=0, help="row sample and recipe seed")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=None, help="override the evaluation recipe's epochs")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    pool = load_records(args.pool)
    if args.rows > len(pool):
        raise ValueError(f"--rows {args.rows}: {args.pool} has only {len(pool)} rows")
    pick = np.sort(np.random.default_rng(args.seed).choice(len(pool), args.rows, replace=False))
    records = [pool[i] for i in pick]
    recipe = evaluation_recipe(args.device, seed=args.seed, epochs=args.epochs)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, train in BACKENDS.items():
                out = Path(tmp) / f"{name}-{r}"
                t = time.perf_counter()
                res = train(args.model, records, out, recipe, progress=False)
                runs.append({"backend": name, "repeat": r, "seconds": time.perf_counter() - t,
                             "train_seconds": res.seconds, "final_loss": res.losses[-1],
                             "mean_loss": float(np.mean(res.losses)), "steps": len(res.losses),
                             "final": res.final})
                print(f"run {name} {r}: {runs[-1]['seconds']:.1f} s, final loss {res.losses[-1]:.6f}", flush=True)
        gaps = [adapter_gap(a["final"], b["final"]) for a, b in zip(runs[::2], runs[1::2], strict=True)]
    secs = {n: [x["seconds"] for x in runs if x["backend"] == n] for n in BACKENDS}
    ratio = float(np.median(secs["trl"]) / np.median(secs["ours"]))
    print(f"{args.rows} rows of {args.pool.name}, model {resolve_model_path(args.model).name}, recipe {recipe}")
    print(f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print("| backend | repeat | wall s | train s | steps | final train loss | mean train loss |")
    print("|---|---|---|---|---|---|---|")
    for x in runs:
        print(f"| {x['backend']} | {x['repeat']} | {x['seconds']:.1f} | {x['train_seconds']:.1f} | {x['steps']} "
              f"| {x['final_loss']:.6f} | {x['mean_loss']:.6f} |")
    print(f"TRL / ours wall time (median of {args.repeats}): {ratio:.3f}")
    print(f"max |adapter_trl - adapter_ours| per repeat: {', '.join(f'{g:.2e}' for g in gaps)}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": args.rows, "recipe": str(recipe), "ratio": ratio, "adapter_gap": gaps,
                                         "runs": [{k: v for k, v in x.items() if k != "final"} for x in runs]},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
