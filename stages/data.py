"""Stage `data`: load the dataset once, check it, and describe it in ``dataset.json``.

Downstream stages rebuild their splits from this description (``stages.lib.datasets.make_splits``);
the source files' sha256 values make the dataset part of every downstream fingerprint.
"""
from __future__ import annotations

from stages.lib.context import StageContext
from stages.lib.dataset_describe import describe


def run(ctx: StageContext) -> dict:
    c = ctx.cfg.data
    meta = describe(dataset=c.dataset, root=c.root, download=c.download, train_limit=c.train_limit,
                    val_limit=c.val_limit, augment=c.augment, crop_padding=c.crop_padding, hflip=c.hflip,
                    image_size=c.image_size)
    ctx.write_json("dataset.json", meta)
    ctx.log(f"{meta['dataset']}: {meta['train_size']} train / {meta['val_size']} val images, "
            f"{meta['num_classes']} classes, input {meta['in_chans']}x{meta['input_size'][0]}x{meta['input_size'][1]}")
    return {"train_size": meta["train_size"], "val_size": meta["val_size"], "num_classes": meta["num_classes"]}
