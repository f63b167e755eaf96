"""Hidden states of an intermediate layer (docs/SPEC.md "Extensions": ``hidden_layer``).

``hidden_layer = N`` means Hugging Face's ``hidden_states[N]``: the output of decoder layer ``N``
(1-based), before any later layer and without the final norm. ``None`` is the paper's last hidden
state (``last_hidden_state``, after the final norm). Stage II reads layer ``N`` with a forward hook
on that decoder layer and stops the forward there, so the layers above it cost nothing.
"""

from __future__ import annotations

from typing import Any

import torch


class _StopForward(Exception):
    """Raised by the capture hook once layer ``N``'s output is in hand (nothing above it is needed)."""


def decoder_layers(base: Any) -> torch.nn.ModuleList:
    """The decoder's layer stack: the ``ModuleList`` child with ``num_hidden_layers`` entries."""
    n = int(base.config.num_hidden_layers)
    for name in ("layers", "h", "blocks"):
        stack = getattr(base, name, None)
        if isinstance(stack, torch.nn.ModuleList) and len(stack) == n:
            return stack
    for child in base.children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == n:
            return child
    raise ValueError(f"{type(base).__name__} has no list of {n} decoder layers: --hidden-layer needs one")


def check_hidden_layer(config: Any, hidden_layer: int | None) -> None:
    """Refuse a layer the model does not have (``1 <= N < num_hidden_layers``; unset: the last)."""
    n = int(config.num_hidden_layers)
    if hidden_layer is not None and not 1 <= hidden_layer < n:
        raise ValueError(f"hidden_layer {hidden_layer} is not an intermediate layer of this {n}-layer model: "
                         f"give 1..{n - 1}, or leave it unset for the last hidden state (after the final norm)")


def layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def hidden_at(base: Any, hidden_layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
              ) -> torch.Tensor:
    """``hidden_states[hidden_layer]`` of a forward of ``base``, ``[B, T, d]``, computing no layer above it."""
    check_hidden_layer(base.config, hidden_layer)
    got: dict[str, torch.Tensor] = {}

    def hook(_module: Any, _args: Any, output: Any) -> None:
        got["h"] = layer_output(output)
        raise _StopForward

    handle = decoder_layers(base)[hidden_layer - 1].register_forward_hook(hook)
    try:
        base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "h" not in got:
        raise RuntimeError(f"decoder layer {hidden_layer} did not run in the forward")
    return got["h"]


def select_hidden(out: Any, hidden_layer: int | None) -> torch.Tensor:
    """From a forward's output: the last hidden state, or ``hidden_states[N]`` (needs
    ``output_hidden_states=True``)."""
    return out.last_hidden_state if hidden_layer is None else out.hidden_states[hidden_layer]
