"""Config schema: defaults, YAML overrides, --set, and one-line errors naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import PipelineConfig, dump_config, load_config, parse_override
from stages.lib.errors import PipelineError

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_default_validates():
    cfg = load_config(ROOT / "pipeline.yaml")
    assert cfg.data.dataset == "fashion_mnist"
    assert cfg.distill.n >= 1


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_presets_validate():
    """Every preset loads, and every value it sets (YAML anchors and merge keys included) is the one in effect."""
    import yaml

    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(presets) >= 11, [p.name for p in presets]
    for p in presets:
        cfg = load_config(p)
        assert cfg.run.name == p.stem, p.name
        written = _leaves(yaml.safe_load(p.read_text()))
        in_effect = _leaves(cfg.model_dump(mode="json"))
        assert any(k.endswith(".epochs") for k in written), p.name  # a recipe, not an empty file
        for key, value in written.items():
            got = in_effect[key]
            assert got == value or (value is not None and str(got) == str(value)), f"{p.name}: {key} = {got!r}, file says {value!r}"
        assert PipelineConfig.model_validate(cfg.model_dump()) == cfg


def test_set_overrides_are_typed():
    cfg = load_config(None, ["distill.epochs=7", "distill.residual=false", "benchmark.batch_sizes=[1, 8]"])
    assert cfg.distill.epochs == 7 and cfg.distill.residual is False and cfg.benchmark.batch_sizes == [1, 8]


@pytest.mark.parametrize("yaml_text, needle", [
    ("distill:\n  epochz: 3\n", "distill.epochz: unknown key"),
    ("distill:\n  epochs: many\n", "distill.epochs"),
    ("distill:\n  n: 0\n", "distill.n"),
    ("bogus_section: {}\n", "bogus_section: unknown key"),
    ("distill: [1, 2\n", "invalid YAML"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("engine:\n  min_batch: 8\n  opt_batch: 4\n", "min_batch <= opt_batch"),
])
def test_bad_yaml_gives_one_line_error(tmp_path, yaml_text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(PipelineError) as e:
        load_config(p)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_set():
    with pytest.raises(PipelineError, match="config file not found"):
        load_config("/nonexistent/pipeline.yaml")
    with pytest.raises(PipelineError, match="expected section.key=value"):
        parse_override("distill.epochs")
    with pytest.raises(PipelineError, match="must name a section"):
        parse_override("epochs=3")


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["student.model=resnet20", "run.name=x"])
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg
    assert PipelineConfig().section("run.seed") == 0


def test_artifacts_are_written_with_normal_permissions(tmp_path):
    import os
    import stat

    from stages.lib.io import atomic_write_text

    p = atomic_write_text(tmp_path / "report.html", "<html></html>")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def test_interrupt_during_an_atomic_write_is_delivered_after_the_file_is_complete(tmp_path):
    import os
    import signal

    from stages.lib.io import _atomic_replace

    def write(f):
        f.write(b"first half ")
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of a checkpoint write
        f.write(b"second half")

    # Ctrl-C's handler as in a terminal: a shell's background job (nohup, &) starts Python with SIGINT ignored
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _atomic_replace(tmp_path / "ckpt.pt", write)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert (tmp_path / "ckpt.pt").read_bytes() == b"first half second half"
