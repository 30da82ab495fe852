"""``dataset.json`` as a typed value: what the data stage found, read back by every later stage.

The file's format is the data stage's (``stages/data.py``) and does not change here: fingerprints hash it.
``DatasetMeta.load`` gives one clear line for a missing or corrupt file; ``to_dict()`` gives back exactly the
keys and values the file holds, for code that takes the plain dict (splits, ETA plans, ONNX metadata).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from stages.lib.errors import PipelineError

_RERUN = "re-run `norm-pipeline stage data`"
# required key -> the JSON types it may have (bool is excluded from the int checks below)
_REQUIRED: dict[str, tuple[type, ...]] = {
    "dataset": (str,), "num_classes": (int,), "in_chans": (int,), "input_size": (list,), "mean": (list,),
    "std": (list,), "classes": (list,), "train_size": (int,), "val_size": (int,)}


@dataclass(frozen=True)
class DatasetMeta:
    dataset: str  # fashion_mnist | cifar10 | cifar100 | imagefolder
    num_classes: int
    in_chans: int
    input_size: list[int]  # [height, width]
    mean: list[float]  # per channel, for normalisation
    std: list[float]
    classes: list[str]
    train_size: int  # after data.train_limit
    val_size: int  # after data.val_limit
    root: Optional[str] = None  # resolved source folder
    train_limit: Optional[int] = None
    val_limit: Optional[int] = None
    augment: bool = True
    crop_padding: int = 0
    hflip: bool = False
    layout: str = "NCHW"
    sources: dict[str, Any] = field(default_factory=dict)  # source file -> sha256 (image folders: a file count)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know: kept, never dropped

    @classmethod
    def from_dict(cls, d: Any, where: str = "dataset.json") -> "DatasetMeta":
        if not isinstance(d, dict):
            raise PipelineError(f"{where} is corrupt (a JSON object was expected, got {type(d).__name__}); {_RERUN}")
        for key, types in _REQUIRED.items():
            if key not in d:
                raise PipelineError(f"{where} is corrupt (no {key!r}); {_RERUN}")
            if not isinstance(d[key], types) or isinstance(d[key], bool):
                raise PipelineError(f"{where} is corrupt ({key!r} is {d[key]!r}); {_RERUN}")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def load(cls, path: Path | str) -> "DatasetMeta":
        """Read a data stage's ``dataset.json``; one line naming the file when it is missing or corrupt."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise PipelineError(f"{path} is missing; {_RERUN}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PipelineError(f"{path} cannot be read ({type(e).__name__}: {e}); {_RERUN}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path} is corrupt (not JSON: {e.msg} at line {e.lineno}); {_RERUN}") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict:
        """The plain dict, key for key as ``dataset.json`` holds it (sorted keys, as the data stage writes)."""
        d = asdict(self)
        d.update(d.pop("extra"))
        return dict(sorted(d.items()))
