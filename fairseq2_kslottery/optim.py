"""``adamw_trainable``: AdamW over the parameters that require gradients only.

fairseq2's own ``adamw`` hands every parameter of the model to the optimizer (frozen ones never get a gradient, so
they do not move, but they still sit in its parameter groups). For ticket tuning the optimizer should see only the
k x d delta — its state is then k x d by construction — so this component filters by ``requires_grad``. Parameter
groups (``optimizer.config.groups``) work as for ``adamw``.
"""

from __future__ import annotations

from typing import Any, Final

from fairseq2.recipe.config import AdamWConfig
from fairseq2.recipe.optim import prepare_parameter_groups
from fairseq2.runtime.dependency import DependencyResolver
from torch.nn import Module
from torch.optim import AdamW, Optimizer

__all__ = ["TRAINABLE_ADAMW", "create_trainable_adamw", "trainable_parameter_groups"]

TRAINABLE_ADAMW: Final = "adamw_trainable"


def trainable_parameter_groups(model: Module, config: AdamWConfig) -> list[Any]:
    """fairseq2's parameter groups for ``model``, keeping only parameters that require gradients."""
    groups = prepare_parameter_groups(model, config.groups)
    out: list[Any] = []
    for group in groups:
        if isinstance(group, dict):
            params = [p for p in group["params"] if p.requires_grad]  # type: ignore[union-attr]
            if params:
                out.append({**group, "params": params})
        elif group.requires_grad:
            out.append(group)
    if not out:
        raise ValueError("The model has no trainable parameter; nothing to optimize.")
    return out


def create_trainable_adamw(resolver: DependencyResolver, config: AdamWConfig) -> Optimizer:
    model = resolver.resolve(Module)
    kwargs: dict[str, Any] = {}
    if config.impl != "auto":
        kwargs["foreach" if config.impl == "naive" else config.impl] = config.impl != "naive"
    return AdamW(
        trainable_parameter_groups(model, config),
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        amsgrad=config.amsgrad,
        maximize=config.maximize,
        capturable=config.capturable,
        differentiable=config.differentiable,
        **kwargs,
    )
