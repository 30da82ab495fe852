"""Model artifacts: tensors and plain data only (loadable with ``torch.load(weights_only=True)``)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from models.norm import NormStudent
from models.registry import create_model
from stages.lib.errors import PipelineError
from stages.lib.io import atomic_torch_save, safe_torch_load

FORMAT = "norm-pipeline/model/1"


def save_model(path: Path, model: nn.Module, *, name: str, num_classes: int, in_chans: int, **extra: Any) -> Path:
    """Save a vanilla contract network (teacher, baseline, merged student)."""
    payload = {"format": FORMAT, "kind": "vanilla", "model": name, "num_classes": num_classes,
               "in_chans": in_chans, "state_dict": _cpu_state(model), **extra}
    return atomic_torch_save(payload, path)


def save_norm_student(path: Path, ns: NormStudent, *, name: str, num_classes: int, in_chans: int, **extra: Any) -> Path:
    """Save a student with its FT (unmerged), with what is needed to rebuild it."""
    payload = {"format": FORMAT, "kind": "norm_student", "model": name, "num_classes": num_classes,
               "in_chans": in_chans, "teacher_channels": ns.ft.teacher_channels, "n": ns.ft.n,
               "residual": ns.ft.residual, "state_dict": _cpu_state(ns), **extra}
    return atomic_torch_save(payload, path)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _payload(path: Path, kind: str, what: str) -> dict:
    obj = safe_torch_load(path, what)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise PipelineError(f"{what} {path} was not written by norm-pipeline (no {FORMAT!r} header)")
    if obj.get("kind") != kind:
        raise PipelineError(f"{what} {path} holds a {obj.get('kind')} model, expected {kind}")
    return obj


def _load_state(model: nn.Module, state: dict, path: Path, what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PipelineError(f"{what} {path} does not fit the model: {_summarise_load_error(e)}") from None


def _summarise_load_error(e: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[1:3])[:300] if len(lines) > 1 else lines[0][:300]


def load_model(path: Path, what: str = "model checkpoint") -> tuple[nn.Module, dict]:
    """Rebuild a vanilla network from ``save_model`` output; returns (model in eval mode, metadata)."""
    obj = _payload(Path(path), "vanilla", what)
    model = create_model(obj["model"], num_classes=obj["num_classes"], in_chans=obj["in_chans"])
    _load_state(model, obj["state_dict"], Path(path), what)
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return model.eval(), meta


def load_norm_student(path: Path, what: str = "NORM student checkpoint") -> tuple[NormStudent, dict]:
    obj = _payload(Path(path), "norm_student", what)
    student = create_model(obj["model"], num_classes=obj["num_classes"], in_chans=obj["in_chans"])
    ns = NormStudent(student, obj["teacher_channels"], n=obj["n"], residual=obj["residual"])
    _load_state(ns, obj["state_dict"], Path(path), what)
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return ns.eval(), meta


def extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A plain state_dict, the authors' ``{"model": sd}``, ``{"state_dict": sd}`` or our own format."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = obj["state_dict"]
    elif isinstance(obj, dict):
        for key in ("model", "state_dict", "net"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PipelineError(f"teacher checkpoint {path} holds no state_dict of tensors (expected a state_dict or {{'model': state_dict}})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


# RepDistiller / NORM (authors' CIFAR code) key names -> ours; each rule is optional for a key, and a key maps
# when exactly one combination of rules names a tensor of the model (see ``map_authors_keys``).
_AUTHORS_RULES: tuple[tuple[str, str], ...] = (
    (r"^(fc|classifier|linear)\.", "head.fc."),  # classifier: resnet/wrn/ResNet50, vgg, shufflenet
    (r"^(block\d)\.layer\.", r"\1."),  # wrn: NetworkBlock.layer
    (r"\.convShortcut\.", ".shortcut."),  # wrn: projection shortcut
    (r"^bn1\.", "bn."),  # wrn: the final BatchNorm
    (r"\.shortcut\.(\d)", r".downsample.\1"),  # ResNet50 (CIFAR): Sequential shortcut
)


def map_authors_keys(state: dict[str, torch.Tensor], model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """Rename an authors'-layout CIFAR state_dict onto ``model``; None when some key has no unique match."""
    own = model.state_dict().keys()
    vgg_blocks = [i for i, m in enumerate(getattr(model, "features", [])) if isinstance(m, nn.Sequential)]
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        cands = {key}
        for pattern, repl in _AUTHORS_RULES:
            cands |= {re.sub(pattern, repl, c) for c in cands}
        for c in list(cands):  # vgg: blockN -> features.<index of the N-th conv block, between the pools>
            m = re.match(r"^block(\d+)\.(\d+\..*)$", c)
            if m and int(m.group(1)) < len(vgg_blocks):
                cands.add(f"features.{vgg_blocks[int(m.group(1))]}.{m.group(2)}")
        hits = cands & own
        if len(hits) != 1:
            return None
        mapped[hits.pop()] = value
    return mapped if len(mapped) == len(state) else None


def import_teacher(path: Path, model: nn.Module, model_name: str) -> nn.Module:
    """Load weights trained elsewhere into ``model``; a clear error when the keys or shapes do not fit.

    Accepted: a plain state_dict, ``{"model": sd}`` (the authors' CIFAR checkpoints, their key names mapped
    onto ours), ``{"state_dict": sd}``, our own model files, a DDP "module." prefix, and torchvision
    state_dicts for the ``tv_*`` models.
    """
    path = Path(path)
    state = extract_state_dict(safe_torch_load(path, "teacher checkpoint"), path)
    own = set(model.state_dict())
    loader = getattr(model, "load_torchvision_state_dict", None)
    try:
        if loader is not None and not set(state) <= own:
            loader(state)
        else:
            if not set(state) <= own:
                state = map_authors_keys(state, model) or state
            model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        msg = _summarise_load_error(e) if isinstance(e, RuntimeError) else str(e)[:300]
        raise PipelineError(
            f"teacher checkpoint {path} does not fit teacher.model={model_name!r}: {msg}; "
            "set teacher.model to the architecture it was trained with"
        ) from None
    return model.eval()
