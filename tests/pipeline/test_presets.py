"""The paper-reproduction presets: they validate, carry the authors' recipe, every value has its source in
docs/presets.md, and their models build with the paper's channel counts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from models.norm import NormStudent
from models.registry import create_model
from pipeline.config import DistillCfg, load_config
from stages.lib.training import TrainSpec, lr_at

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

# preset stem -> (teacher, student, last-stage channels of each (the authors' model_channels), student lr)
CIFAR = {
    "cifar100_resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4", 256, 256, 0.05),
    "cifar100_wrn40_2_wrn16_2": ("wrn_40_2", "wrn_16_2", 128, 128, 0.05),
    "cifar100_resnet56_resnet20": ("resnet56", "resnet20", 64, 64, 0.05),
    "cifar100_vgg13_vgg8": ("vgg13", "vgg8", 512, 512, 0.05),
    "cifar100_resnet32x4_shufflev2": ("resnet32x4", "shufflenetv2", 256, 1024, 0.01),
}


def test_every_expected_preset_exists():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    expected = set(CIFAR) | {f"{n}_kd" for n in CIFAR} | {"imagenet_resnet34_resnet18"}
    assert expected <= names, f"missing presets: {sorted(expected - names)}"


@pytest.mark.parametrize("stem", sorted(CIFAR) + sorted(f"{n}_kd" for n in CIFAR))
def test_cifar_preset_recipe(stem):
    teacher, student, _, _, student_lr = CIFAR[stem.removesuffix("_kd")]
    cfg = load_config(CONFIGS / f"{stem}.yaml")
    assert cfg.run.name == stem and cfg.data.dataset == "cifar100" and cfg.data.root is None
    assert cfg.data.crop_padding == 4 and cfg.data.hflip and cfg.data.augment
    assert (cfg.teacher.model, cfg.student.model) == (teacher, student) and cfg.teacher.checkpoint is None
    for section, lr in (("teacher", 0.05), ("baseline", student_lr), ("distill", student_lr)):
        c = getattr(cfg, section)
        assert (c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay) == (240, 64, lr, 0.9, 5e-4), section
        spec = TrainSpec.from_cfg(c)
        drops = [e for e in range(1, 240) if lr_at(spec, e) < lr_at(spec, e - 1)]
        assert drops == [150, 180, 210], section
    d = cfg.distill
    assert d.n == 8 and d.residual and d.alpha == 1.0 and d.logit_standardize and d.logit_scale == 2.5
    assert d.beta == (1.0 if stem.endswith("_kd") else 0.0)
    assert d.gamma == 0.1, "the authors' README recipe: -r 0.1 -a 0 -b 1.0 -s 8"
    assert d.temperature == 4.0 and d.norm_schedule == DistillCfg().norm_schedule
    assert not cfg.teacher.logit_standardize and not cfg.baseline.logit_standardize


@pytest.mark.parametrize("stem", sorted(CIFAR))
def test_cifar_preset_models_build_with_the_papers_channels(stem):
    teacher, student, c_t, c_s, _ = CIFAR[stem]
    d = load_config(CONFIGS / f"{stem}.yaml").distill
    t = create_model(teacher, num_classes=100, in_chans=3)
    s = create_model(student, num_classes=100, in_chans=3)
    assert (t.num_features, s.num_features) == (c_t, c_s)
    ns = NormStudent(s, t.num_features, n=d.n, residual=d.residual).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        logits, expanded = ns(x)
        feats = t.eval().forward_features(x)
    assert logits.shape == (2, 100) and expanded.shape[1] == 8 * c_t and feats.shape[1] == c_t


def test_imagenet_preset_recipe_and_models():
    cfg = load_config(CONFIGS / "imagenet_resnet34_resnet18.yaml")
    assert cfg.data.dataset == "imagefolder" and cfg.data.image_size == 224 and cfg.data.root is None
    assert (cfg.teacher.model, cfg.student.model) == ("tv_resnet34", "tv_resnet18")
    assert cfg.teacher.checkpoint is not None, "the ImageNet teacher is imported, not trained"
    for c in (cfg.baseline, cfg.distill):
        assert (c.epochs, c.batch_size, c.lr, c.weight_decay) == (100, 256, 0.1, 1e-4)
        spec = TrainSpec.from_cfg(c)
        assert [e for e in range(1, 100) if lr_at(spec, e) < lr_at(spec, e - 1)] == [30, 60, 90]
    assert cfg.distill.n == 8 and cfg.distill.beta == 0 and cfg.distill.norm_schedule[-1] == (1.0, 0.1)
    t = create_model("tv_resnet34", num_classes=1000, in_chans=3)
    s = create_model("tv_resnet18", num_classes=1000, in_chans=3)
    assert (t.num_features, s.num_features) == (512, 512)
    with torch.no_grad():
        assert t.eval().forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 512, 7, 7)


def test_presets_need_a_data_root(tmp_path):
    """data.root is the user's to set: the data stage says so in one line."""
    from stages.lib.dataset_describe import describe
    from stages.lib.errors import PipelineError

    for stem, dataset in (("cifar100_vgg13_vgg8", "cifar100"), ("imagenet_resnet34_resnet18", "imagefolder")):
        cfg = load_config(CONFIGS / f"{stem}.yaml")
        c = cfg.data
        with pytest.raises(PipelineError, match="needs data.root"):
            describe(dataset=c.dataset, root=c.root, download=False, train_limit=None, val_limit=None,
                     augment=c.augment, crop_padding=c.crop_padding, hflip=c.hflip, image_size=c.image_size)
        assert cfg.data.dataset == dataset


# ----------------------------------------------------------------------------- every value has a source
def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _source_table(heading: str) -> dict[str, tuple[str, str]]:
    """docs/presets.md table under ``heading``: key -> (value cell, source cell); ``*.k`` stands for the
    teacher, baseline and distill sections."""
    import re

    text = (ROOT / "docs" / "presets.md").read_text()
    body = text.split(heading, 1)[1].split("\n#", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        for key in re.findall(r"`([\w.*]+)`", cells[0]):
            names = [key.replace("*", s) for s in ("teacher", "baseline", "distill")] if key.startswith("*.") else [key]
            for name in names:
                rows[name] = (cells[1], cells[2])
    return rows


def _mentions(cell: str, value: object) -> bool:
    import re

    if isinstance(value, bool):
        return str(value).lower() in cell.lower()
    if isinstance(value, (int, float)):
        return any(float(tok) == float(value) for tok in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", cell))
    if isinstance(value, list):
        return all(_mentions(cell, v) for v in value)
    return str(value) in cell


@pytest.mark.parametrize("pattern, heading", [("cifar100_*.yaml", "### CIFAR-100 presets"),
                                              ("imagenet_*.yaml", "### ImageNet preset")])
def test_every_preset_value_has_its_source_in_the_docs(pattern, heading):
    """docs/presets.md gives each value the presets set, with its source (paper, README, script, code, or an
    assumption said as such); a preset value missing there, or different from it, fails."""
    import yaml

    table = _source_table(heading)
    assert table, f"no source table under {heading!r} in docs/presets.md"
    for path in sorted(CONFIGS.glob(pattern)):
        for key, value in _flatten(yaml.safe_load(path.read_text())).items():
            if key in ("run.name", "data.root"):
                continue
            assert key in table, f"{path.name}: {key} has no row in docs/presets.md"
            cell, source = table[key]
            assert _mentions(cell, value), f"{path.name}: {key}={value!r}, docs/presets.md says {cell!r}"
            assert re.search(r"paper|README|script|code|RepDistiller|assumption", source), (key, source)


def test_tiny_config_is_tiny_and_in_the_readme():
    """configs/tiny.yaml: a few hundred real Fashion-MNIST images, one epoch, tiny networks, every stage on;
    the README offers it as the quickest way to see every stage (its wall time is measured, not asserted)."""
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert cfg.data.dataset == "fashion_mnist" and cfg.data.root is None  # the real, installed dataset
    assert 100 <= cfg.data.train_limit <= 1000 and cfg.data.val_limit <= 1000
    assert cfg.teacher.epochs == cfg.baseline.epochs == cfg.distill.epochs == 1
    for name in (cfg.teacher.model, cfg.student.model):
        assert sum(p.numel() for p in create_model(name, num_classes=10, in_chans=1).parameters()) < 300_000
    assert cfg.export.exporter == "torchscript" and cfg.benchmark.blocks <= 8
    assert "norm-pipeline run -c configs/tiny.yaml" in (ROOT / "README.md").read_text()
