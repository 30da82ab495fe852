"""ETA arithmetic: a training stage from its own timed batches/evaluations, the run from the FLOP plan."""
from __future__ import annotations

import pytest

from stages.lib.eta import FIXED_SECONDS, RunEta, StageEta, fmt_eta


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_stage_eta_from_its_own_speed():
    clk = FakeClock()
    e = StageEta(epochs=2, batches=4, eval_batches=2, eval_weight=0.5, clock=clk)
    assert e.remaining() is None  # nothing timed yet
    e.start_batches()
    for _ in range(2):
        clk.t += 1.0
        e.batch_done()
    # 6 batches left at 1 s + 2 evaluations priced at 2 batches x 0.5 x 1 s
    assert e.remaining() == pytest.approx(6 + 2 * 1.0)
    for _ in range(2):
        clk.t += 1.0
        e.batch_done()
    e.eval_started()
    clk.t += 3.0
    e.eval_done()  # the real evaluation took 3 s: that replaces the guess
    assert e.remaining() == pytest.approx(4 * 1.0 + 1 * 3.0)
    assert e.elapsed == pytest.approx(7.0)


def test_stage_eta_after_resume_counts_only_the_epochs_left():
    clk = FakeClock()
    e = StageEta(epochs=3, batches=2, eval_batches=1, start_epoch=2, eval_weight=1.0, clock=clk)
    e.start_batches()
    clk.t += 2.0
    e.batch_done()
    assert e.remaining() == pytest.approx(1 * 2.0 + 1 * 2.0)


def test_stage_eta_counts_only_the_evaluations_val_every_asks_for():
    clk = FakeClock()
    e = StageEta(epochs=4, batches=2, eval_batches=3, eval_weight=1.0, evals=1, clock=clk)  # val_every=0
    e.start_batches()
    clk.t += 1.0
    e.batch_done()
    assert e.remaining() == pytest.approx(7 * 1.0 + 1 * 3.0)  # one evaluation of 3 batches, not four


def test_run_eta_from_the_plan_and_the_measured_speed():
    clk = FakeClock()
    run = RunEta(clock=clk)
    order = ["data", "teacher", "baseline", "distill", "merge", "verify"]
    run.plan(order, {"teacher": 100.0, "baseline": 50.0, "distill": 200.0, "verify": 10.0})
    run.end("data", 0.5)
    run.begin("teacher")
    assert run.total(None) is None  # no speed measured yet
    run.stage_progress(20.0)  # the teacher predicts 20 s for 100 FLOPs
    after = 50 * 0.2 + 200 * 0.2 + FIXED_SECONDS["merge"] + 10 * 0.2 + FIXED_SECONDS["verify"]
    assert run.after_current() == pytest.approx(after)
    assert run.total(5.0) == pytest.approx(5.0 + after)
    run.end("teacher", 30.0)  # it really took 30 s: 0.3 s per FLOP from now on
    run.begin("baseline")
    clk.t += 4.0
    assert run.total(None) == pytest.approx(50 * 0.3 - 4.0 + 200 * 0.3 + FIXED_SECONDS["merge"] + 10 * 0.3
                                            + FIXED_SECONDS["verify"])


def test_cached_stages_do_not_calibrate_the_speed():
    run = RunEta()
    run.plan(["teacher", "distill"], {"teacher": 100.0, "distill": 100.0})
    run.begin("teacher")
    run.end("teacher", 0.01, ran=False)
    assert run.seconds_per_flop is None


def test_fmt_eta():
    assert fmt_eta(None) == "?"
    assert fmt_eta(65.4) == "1:05"
    assert fmt_eta(3723) == "1:02:03"
    assert fmt_eta(-3) == "0:00"


def test_conv_linear_flops_equals_torchs_flop_counter():
    from models.norm import LogitsOnly, NormStudent
    from models.registry import create_model
    from stages.lib.eta import conv_linear_flops
    from stages.lib.flops import count_flops

    t = create_model("resnet14", num_classes=10, in_chans=1)
    for m in (t, create_model("wrn_16_2", num_classes=10, in_chans=3), create_model("mobilenetv2", num_classes=10),
              LogitsOnly(NormStudent(create_model("resnet8", num_classes=10, in_chans=1), t.num_features, n=2))):
        shape = [1, 1, 28, 28] if m is t or isinstance(m, LogitsOnly) else [1, 3, 32, 32]
        assert conv_linear_flops(m, shape) == count_flops(m, shape)


def test_plan_flops_counts_epochs_images_and_the_teacher(tiny_data_root):
    from models.norm import LogitsOnly, NormStudent
    from models.registry import create_model
    from pipeline.config import load_config
    from stages.lib.dataset_describe import describe
    from stages.lib.eta import plan_flops
    from stages.lib.flops import count_flops

    cfg = load_config(None, [f"data.root={tiny_data_root}", "teacher.model=resnet14", "student.model=resnet8",
                             "teacher.epochs=2", "baseline.epochs=3", "distill.epochs=4", "distill.n=2"])
    meta = describe(dataset="fashion_mnist", root=tiny_data_root, download=False, train_limit=None, val_limit=None,
                    augment=True, crop_padding=2, hflip=True, image_size=28)
    plan = plan_flops(cfg, meta, ["teacher", "baseline", "distill", "verify"])
    shape = [1, 1, 28, 28]
    t = create_model("resnet14", num_classes=10, in_chans=1)
    f_t = count_flops(t, shape)
    f_s = count_flops(create_model("resnet8", num_classes=10, in_chans=1), shape)
    f_ns = count_flops(LogitsOnly(NormStudent(create_model("resnet8", num_classes=10, in_chans=1), t.num_features, n=2)), shape)
    nt, nv = meta["train_size"], meta["val_size"]
    assert plan["teacher"] == pytest.approx(2 * (nt * 3 * f_t + nv * f_t))
    assert plan["baseline"] == pytest.approx(3 * (nt * 3 * f_s + nv * f_s))
    assert plan["distill"] == pytest.approx(4 * (nt * (3 * f_ns + f_t) + nv * f_ns))
    assert plan["verify"] == pytest.approx(nv * (f_s + f_ns))

    sparse = load_config(None, [f"data.root={tiny_data_root}", "teacher.model=resnet14", "student.model=resnet8",
                                "teacher.epochs=2", "baseline.epochs=3", "distill.epochs=4", "distill.n=2",
                                "teacher.val_every=0", "baseline.val_every=2", "distill.val_every=0"])
    plan = plan_flops(sparse, meta, ["teacher", "baseline", "distill"])
    assert plan["teacher"] == pytest.approx(2 * nt * 3 * f_t + 1 * nv * f_t)  # the last epoch only
    assert plan["baseline"] == pytest.approx(3 * nt * 3 * f_s + 2 * nv * f_s)  # epochs 2 and 3
    assert plan["distill"] == pytest.approx(4 * nt * (3 * f_ns + f_t) + 1 * nv * f_ns)
