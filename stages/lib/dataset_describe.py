"""Describe a dataset for ``dataset.json`` (the data stage's output): what downstream needs to rebuild the
splits, plus classes, sizes, mean/std and the source files' sha256 values."""
from __future__ import annotations

from pathlib import Path

from stages.lib import datasets as ds
from stages.lib.io import sha256_file


def describe(*, dataset: str, root: Path | None, download: bool, train_limit: int | None, val_limit: int | None,
             augment: bool, crop_padding: int, hflip: bool, image_size: int) -> dict:
    """Everything downstream needs to rebuild the splits, plus classes, sizes, mean/std and file hashes."""
    meta = {"dataset": dataset, "train_limit": train_limit, "val_limit": val_limit, "augment": augment,
            "crop_padding": crop_padding, "hflip": hflip}
    if dataset == "imagefolder":
        if root is None:
            from stages.lib.errors import PipelineError

            raise PipelineError("data.dataset=imagefolder needs data.root (a folder with train/<class>/ and val/<class>/)")
        classes = ds.check_image_folder(Path(root))
        train_files = sorted(p for p in (Path(root) / "train").rglob("*") if p.is_file())
        val_files = sorted(p for p in (Path(root) / "val").rglob("*") if p.is_file())
        meta.update(root=str(Path(root).resolve()), classes=classes, num_classes=len(classes), in_chans=3,
                    input_size=[image_size, image_size], mean=ds.IMAGENET_MEAN, std=ds.IMAGENET_STD,
                    train_size=min(len(train_files), train_limit or len(train_files)),
                    val_size=min(len(val_files), val_limit or len(val_files)),
                    layout="NCHW", sources={"files": len(train_files) + len(val_files)})
        return meta
    raw = ds.load_raw(dataset, root, download)
    xt, _ = ds._subset(*raw["train"], train_limit)
    xv, _ = ds._subset(*raw["val"], val_limit)
    mean, std = ds.channel_stats(raw["train"][0])
    resolved_root = Path(root) if root else ds.FASHION_MNIST_ROOT
    meta.update(root=str(resolved_root.resolve()), classes=raw["classes"], num_classes=len(raw["classes"]),
                in_chans=int(xt.shape[1]), input_size=[int(xt.shape[2]), int(xt.shape[3])], mean=mean, std=std,
                train_size=int(len(xt)), val_size=int(len(xv)), layout="NCHW",
                sources={Path(f).name: sha256_file(f) for f in raw["train_files"] + raw["val_files"]})
    return meta
