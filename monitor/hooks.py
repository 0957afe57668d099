"""One vocabulary of hook points over every supported architecture.

A hook point is named ``blocks.{layer}.{site}`` (TransformerLens style). Underneath, a small
adapter per model family says which submodule produces each site, so the rest of latentwatch
never looks at module names.

Sites, for decoder block ``i``:

* ``resid_pre``  - residual stream entering block ``i``
* ``attn_out``   - what attention adds to the residual stream (after any post-attention norm)
* ``mlp_out``    - what the MLP / MoE block adds to the residual stream (after any post-MLP norm)
* ``resid_post`` - residual stream leaving block ``i``
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from monitor.domain import HookPoint, HookPointError


@dataclass(frozen=True)
class FamilyAdapter:
    """Where one model family keeps its decoder blocks and residual contributions."""

    blocks: str  # attribute path from the *ForCausalLM module to the block ModuleList
    attn_out: str  # block submodule whose output is attention's contribution to the residual
    mlp_out: str  # block submodule whose output is the MLP's contribution to the residual


_LLAMA_LIKE = FamilyAdapter("model.layers", "self_attn", "mlp")
ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2_moe": _LLAMA_LIKE,
    # Gemma2 normalises each contribution before adding it, so read after those norms.
    "gemma2": FamilyAdapter("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "gpt2": FamilyAdapter("transformer.h", "attn", "mlp"),
}


def adapter_for(model: nn.Module) -> FamilyAdapter:
    model_type = getattr(model.config, "model_type", None)
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise HookPointError(
            f"unsupported architecture {model_type!r}; latentwatch has hook adapters for "
            f"{', '.join(sorted(ADAPTERS))}. Add a FamilyAdapter in monitor/hooks.py."
        ) from None


def _lookup(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


HookFn = Callable[[torch.Tensor], torch.Tensor | None]
"""Receives the site's activation [batch, seq, d_model]; returns a replacement or None."""


class HookMap:
    """Resolves hook points on one model and attaches functions to them."""

    def __init__(self, model: nn.Module):
        self.adapter = adapter_for(model)
        self.blocks: nn.ModuleList = _lookup(model, self.adapter.blocks)
        self.num_layers = len(self.blocks)

    def resolve(self, name: str | HookPoint) -> HookPoint:
        point = name if isinstance(name, HookPoint) else HookPoint.parse(name)
        if not 0 <= point.layer < self.num_layers:
            raise HookPointError(
                f"hook point {str(point)!r} is out of range: this model has blocks 0..{self.num_layers - 1}"
            )
        return point

    def attach(self, point: HookPoint, fn: HookFn) -> torch.utils.hooks.RemovableHandle:
        block = self.blocks[point.layer]
        if point.site == "resid_pre":

            def pre_hook(module, args, kwargs):
                if args:
                    new = fn(args[0])
                    return None if new is None else ((new, *args[1:]), kwargs)
                new = fn(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            return block.register_forward_pre_hook(pre_hook, with_kwargs=True)

        module = block
        if point.site == "attn_out":
            module = _lookup(block, self.adapter.attn_out)
        elif point.site == "mlp_out":
            module = _lookup(block, self.adapter.mlp_out)

        def post_hook(module, args, output):
            new = fn(_first(output))
            return None if new is None else _replace_first(output, new)

        return module.register_forward_hook(post_hook)
