"""Stage II throughput, side by side, in one process on the same model, tokens and batches.

(a) our scoring (``trim_select.scoring.Scorer``: base model forward + token matching + pooling),
(b) the bare base-model forward on the same batches (the floor),
(c) a plain Hugging Face loop: CausalLM with logits and hidden states, length-sorted padded batches,
and their ratios, plus FLOP accounting: model FLOPs per token and the fraction of a float32 (and,
where supported, bf16) matmul rate measured in the same run (on CUDA the bf16 matmul peak).

Model FLOPs per token (useful work, padding excluded; no LM head: Stage II stops at the last
hidden state)::

    F = 2 N + 4 L H d_h c,   c = sum_s T_s (T_s + 1) / 2 / sum_s T_s

``N`` = parameters outside the embedding (every weight matrix is one multiply-add per token),
``L`` layers, ``H`` query heads of width ``d_h``, ``c`` the mean causal context per token at the
measured lengths ``T_s`` (QK^T and AV are 2 d_h multiply-adds per head per visible key each).

    python benchmarks/stage2.py                       # SmolLM2-135M shape, random init, CPU
    python benchmarks/stage2.py --shape llama-1b --n 6000 --device cuda --batch-tokens 65536

Models are random-init from a config (no download); sequences are synthetic with long-tailed
lengths (log-normal, mean ~344 tokens by default).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from trim_select.batching import collate, plan_batches
from trim_select.data import TokenSequence
from trim_select.fingerprints import Fingerprints
from trim_select.models import cpu_supports_bf16, resolve_device, resolve_dtype
from trim_select.scoring import Scorer

SHAPES = {
    # SmolLM2-135M
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, head_dim=64),
    # Llama-3.2-1B
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, head_dim=64),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, head_dim=16),
}


def synthetic_sequences(n: int, vocab: int, mean_len: float, max_len: int, seed: int) -> list[TokenSequence]:
    rng = np.random.default_rng(seed)
    sigma = 0.8
    mu = np.log(mean_len) - sigma**2 / 2
    lengths = np.clip(rng.lognormal(mu, sigma, n).astype(int), 8, max_len)
    out = []
    for n_tok in lengths:
        ids = rng.integers(3, vocab, n_tok)
        out.append(TokenSequence(ids, np.ones(n_tok, bool), np.zeros(n_tok, bool)))
    return out


def flops_per_token(base: torch.nn.Module, lengths: list[int]) -> tuple[float, float, float]:
    """``(F, 2N, attention term)`` per token, formula in the module docstring."""
    cfg = base.config
    n_params = sum(p.numel() for n, p in base.named_parameters() if "embed" not in n)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    t = np.asarray(lengths, dtype=np.float64)
    context = float((t * (t + 1) / 2).sum() / t.sum())
    attn = 4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * context
    return 2.0 * n_params + attn, 2.0 * n_params, attn


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--n", type=int, default=300, help="sequences")
    ap.add_argument("--mean-len", type=float, default=344)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--fingerprints", type=int, default=2000, help="fingerprinted token classes")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(4096, args.max_len),
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    seqs = synthetic_sequences(args.n, cfg.vocab_size, args.mean_len, args.max_len, args.seed)
    n_tokens = int(sum(len(s) for s in seqs))

    rng = np.random.default_rng(args.seed + 1)
    n_fp = min(args.fingerprints, cfg.vocab_size // 2)
    ids = np.sort(rng.choice(np.arange(3, cfg.vocab_size), size=n_fp, replace=False))
    vec = rng.standard_normal((len(ids), cfg.hidden_size)).astype(np.float32)
    fp = Fingerprints(ids, vec / np.linalg.norm(vec, axis=1, keepdims=True), np.ones(len(ids), np.int64))

    t = time.perf_counter()
    scorer = Scorer(model, fp, batch_tokens=args.batch_tokens, compile=args.compile)
    setup_s = time.perf_counter() - t
    batches = plan_batches([len(s) for s in seqs], args.batch_tokens, 256)
    base = scorer.base

    def ours() -> None:
        scorer.score_sequences(seqs)

    @torch.no_grad()
    def bare() -> None:
        for idx in batches:
            b = collate([seqs[i] for i in idx], device)
            base(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(), use_cache=False)
            sync(device)

    @torch.no_grad()
    def hf_loop() -> None:
        for idx in batches:
            b = collate([seqs[i] for i in idx], device)
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(),
                        output_hidden_states=True, use_cache=False)
            out.hidden_states[-1].float().cpu()
            sync(device)

    runs = {"ours": ours, "bare": bare, "hf": hf_loop}
    # warm-up on a slice (kernels, allocator, compile)
    short = [seqs[i] for i in batches[-1]]
    scorer.score_sequences(short)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():  # interleaved so drift hits all three alike
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    tps = {k: n_tokens / v for k, v in best.items()}

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads), dtype {str(dtype).replace('torch.', '')}, shape {args.shape}, "
          f"{args.n} sequences, {n_tokens} tokens (mean {n_tokens / args.n:.0f}), {len(batches)} batches "
          f"of <= {args.batch_tokens} padded tokens, {len(fp)} fingerprints (matcher setup {setup_s:.2f}s), "
          f"best of {args.repeats}")
    print("| run | seconds | tokens/s | vs bare forward | vs HF loop |")
    print("|---|---|---|---|---|")
    labels = {"ours": "(a) trim-select scoring", "bare": "(b) bare base-model forward",
              "hf": "(c) plain HF loop (logits + hidden states)"}
    for k in ("ours", "bare", "hf"):
        print(f"| {labels[k]} | {best[k]:.2f} | {tps[k]:,.0f} | {best[k] / best['bare']:.3f}x time | "
              f"{tps[k] / tps['hf']:.2f}x speed |")
    print(f"cost of scoring over bare forward: {best['ours'] / best['bare']:.3f}x (goal <= 1.10x)")
    f_tok, dense, attn = flops_per_token(base, [len(s) for s in seqs])
    print(f"model FLOPs per token F = 2N + 4*L*H*d_h*c = {dense / 1e6:,.1f} + {attn / 1e6:,.1f} "
          f"= {f_tok / 1e6:,.1f} MFLOP at the measured lengths; ours runs at {tps['ours'] * f_tok / 1e9:,.1f} GFLOP/s")
    if device.type == "cuda":
        peaks = {"bfloat16": matmul_peak(device, torch.bfloat16)}
    else:
        peaks = {"float32": matmul_peak(device, torch.float32, n=2048, reps=5)}
        if cpu_supports_bf16():
            peaks["bfloat16"] = matmul_peak(device, torch.bfloat16, n=2048, reps=5)
    for name, peak in peaks.items():
        print(f"measured {name} matmul ({'8192' if device.type == 'cuda' else '2048'}^2) {peak / 1e9:,.0f} GFLOP/s; "
              f"ours (dtype {str(dtype).replace('torch.', '')}) reaches {tps['ours'] * f_tok / peak:.0%} of it, "
              f"the bare forward {tps['bare'] * f_tok / peak:.0%}")


if __name__ == "__main__":
    main()
