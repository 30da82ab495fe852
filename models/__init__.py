"""Networks and the NORM mathematics (pure PyTorch).

``from models import create_model, list_models`` works like ``timm.create_model`` / ``timm.list_models``.
"""
from __future__ import annotations

from models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
