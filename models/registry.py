"""Model registry (timm's contract): ``@register_model`` factories and ``create_model(name, ...)``."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory under its function name (``num_classes`` and ``in_chans`` keywords)."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def _ensure_loaded() -> None:
    # Importing the zoo modules runs their @register_model decorators.
    from models import zoo  # noqa: F401


def list_models() -> list[str]:
    """All registered model names, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a registered network; an unknown name raises ``ValueError`` listing the known ones."""
    _ensure_loaded()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}") from None
    model = factory(num_classes=num_classes, in_chans=in_chans, **kwargs)
    setattr(model, "model_name", name)  # noqa: B010 - a plain attribute on the module (mypy: not a submodule)
    return model
