"""The CLI's options, each written once: those of a config field take their ``--help`` from the field's
documentation and their default from the dataclass (``config.documented``), as bergson builds its
CLI from its dataclass configs. Commands list their own options and add the shared groups below with
:func:`with_options` (the options arrive in the command's ``**options``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.models import OptionInfo

from ..config import EXACT_SPEC_DOC, FingerprintConfig, RenderConfig, RuntimeConfig, ScoreConfig, field_doc
from ..training.recipe import LoraRecipe

F = TypeVar("F", bound=Callable[..., Any])

# id of each typer.Option built from a config field -> (dataclass, field name); read by the tests
FIELD_OPTIONS: dict[int, tuple[type, str]] = {}
_UNSET: Any = object()


def field_option(cls: type, name: str, *flags: str, prefix: str = "") -> OptionInfo:
    """A ``typer.Option`` for field ``name`` of ``cls``: its help is the field's documentation (after
    ``prefix``, e.g. the method it is for); the flag is ``--name-with-dashes`` unless ``flags`` are given."""
    info = typer.Option(*(flags or (f"--{name.replace('_', '-')}",)), help=prefix + field_doc(cls, name))
    FIELD_OPTIONS[id(info)] = (cls, name)
    return info


@dataclass(frozen=True)
class Opt:
    """One command-line parameter: its Python name, ``Annotated`` type and default (and the config
    field it fills, for those built from one)."""

    name: str
    annotation: Any
    default: Any = inspect.Parameter.empty
    field: str | None = None


def field_opt(cls: type, name: str, tp: Any, *flags: str, param: str | None = None, default: Any = _UNSET,
              prefix: str = "") -> Opt:
    """The parameter of a config field, default read from ``cls()`` unless given (e.g. as a string)."""
    value = getattr(cls(), name) if default is _UNSET else default
    return Opt(param or name, Annotated[tp, field_option(cls, name, *flags, prefix=prefix)], value, name)


def with_options(*groups: Sequence[Opt]) -> Callable[[F], F]:
    """Append the parameters of ``groups`` (keyword-only, in order) to a command's signature, so typer
    offers them; the command receives them in its ``**options``."""

    def add(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        extra = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=o.annotation,
                                   default=o.default) for g in groups for o in g]
        fn.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
        return fn

    return add


def pick(options: dict[str, Any], group: Sequence[Opt]) -> dict[str, Any]:
    """The values of ``group``'s parameters, taken out of ``options``."""
    return {o.name: options.pop(o.name) for o in group if o.name in options}


# -- the command's own arguments (no config field) --------------------------------------------------
Pool = Annotated[Path, typer.Option("--pool", help="Pool file (.jsonl/.jsonl.gz/.json/.parquet/datasets folder).")]
Targets = Annotated[Path, typer.Option("--targets", help="Target examples (5-10 rows of the target task).")]
Out = Annotated[Path, typer.Option("--out", help="Output folder (resumable: rerun the same command).")]
Budget = Annotated[str, typer.Option("--budget", help="Coreset size: a count (1000) or a share (5%).")]
Model = Annotated[str, typer.Option("--model", help="'default' (SmolLM2-135M-Instruct), HF folder, .gguf, "
                                                   "or LoRA adapter folder.")]
TargetFormat = Annotated[str | None, typer.Option("--target-format", help="Format of the target file (default: "
                                                                          "--format, else auto-detect).")]
Format = Annotated[str | None, field_option(RenderConfig, "format")]
MaxLen = Annotated[int, field_option(RenderConfig, "max_length")]
BatchTok = Annotated[int, field_option(RuntimeConfig, "batch_tokens")]
Device = Annotated[str, field_option(RuntimeConfig, "device")]
Trust = Annotated[bool, field_option(RuntimeConfig, "trust_remote_code")]
Skip = Annotated[bool, typer.Option("--skip-invalid", help="Skip bad rows (counted, written to rejected.jsonl) "
                                                          "instead of stopping.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Discard partial results from other settings.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]

# -- shared groups ---------------------------------------------------------------------------------
TOKENS = [
    field_opt(RenderConfig, "scope", str),
    field_opt(RenderConfig, "score_template", bool, "--score-template/--content-only"),
    Opt("exact_spec", Annotated[bool, typer.Option("--exact-spec", help=EXACT_SPEC_DOC)], False),
]
STAGE_I = [field_opt(FingerprintConfig, name, tp) for name, tp in
           (("layers", int), ("row_weight", float), ("col_weight", float), ("hidden_layer", int | None),
                                  ("hidden_fraction", float | None))]
_penalty = ScoreConfig().penalty
STAGE_II = [
    field_opt(ScoreConfig, "penalty", str, default="none" if _penalty is None else str(_penalty)),
    *(field_opt(ScoreConfig, name, float) for name in ("mean_weight", "max_weight", "coverage_weight")),
    field_opt(ScoreConfig, "idf", bool, "--idf/--no-idf"),
    field_opt(ScoreConfig, "generic_rows", int),
    field_opt(ScoreConfig, "generic_seed", int),
]
FORWARD = [
    Opt("max_length", MaxLen, RenderConfig().max_length),
    Opt("batch_tokens", BatchTok, RuntimeConfig().batch_tokens),
    Opt("device", Device, RuntimeConfig().device),
    field_opt(RuntimeConfig, "dtype", str),
    Opt("trust_remote_code", Trust, RuntimeConfig().trust_remote_code),
]
CHUNKS = [field_opt(RuntimeConfig, "chunk_size", int)]
CONTROL = [Opt("skip_invalid", Skip, False), Opt("overwrite", Overwrite, False), Opt("quiet", Quiet, False)]
ENGINE = [
    Opt("engine", Annotated[str, typer.Option(
        "--engine", help="Stage II engine. local: this machine, one worker per visible GPU (--workers N CPU "
                         "processes without GPUs); ray: a Ray Data pipeline (pip install 'trim-select[ray]').")],
        "local"),
    Opt("workers", Annotated[int | None, typer.Option(
        "--workers", help="Workers (local) or actors (ray); default: one per GPU, else 1.")], None),
    Opt("ray_address", Annotated[str | None, typer.Option(
        "--ray-address", help="Ray cluster to join (auto, ray://HEAD:10001); default: start a local Ray.")], None),
]
SHARD = [Opt("shard", Annotated[str | None, typer.Option(
    "--shard", help="i/n: score only chunks k with k % n == i (e.g. Slurm array task i of n), "
                    "then combine with `trim-select merge OUT`.")], None)]

# -- the warmup recipe (Table 7 defaults live in LoraRecipe) ----------------------------------------
RECIPE = [field_opt(LoraRecipe, name, tp) for name, tp in (
    ("epochs", int), ("lr", float), ("warmup_ratio", float), ("schedule", str), ("lora_r", int),
    ("lora_alpha", int), ("lora_dropout", float))]
RECIPE += [
    field_opt(LoraRecipe, "target_modules", str, "--lora-targets", param="lora_targets",
              default=",".join(LoraRecipe().target_modules)),
    *(field_opt(LoraRecipe, name, tp) for name, tp in (
        ("batch_size", int), ("micro_batch_tokens", int), ("micro_batch_size", int), ("weight_decay", float),
        ("save_steps", int), ("gradient_checkpointing", bool))),
]


def make_recipe(*, lora_targets: str, **fields: Any) -> LoraRecipe:
    """A :class:`~trim_select.training.lora.LoraRecipe` from CLI values (bad values -> a usage error)."""
    targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    try:
        return LoraRecipe(target_modules=targets, **fields)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
