"""The mutations `scripts/mutate.py` applies, one at a time: each a small, plausible bug and the tests meant to
catch it.

A mutation is a list of exact text replacements in one file (each ``old`` must occur exactly once, so a
mutation that no longer matches the code is reported as stale instead of silently testing nothing). Tests
are pytest node ids or files, kept to the ones that should catch the bug: the whole suite per mutation would
take hours. Ids marked "issue N" are the bugs the suite let through before its tests were written.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    id: str
    path: str
    what: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]


MERGE = ("tests/models/test_merge.py",)
LOSSES = ("tests/models/test_losses.py",)
FT = ("tests/models/test_norm.py", "tests/models/test_merge.py")
TRAINING = ("tests/stages/test_training.py", "tests/pipeline/test_resume_state.py")
DISTILL = ("tests/stages/test_wiring.py",)
IO = ("tests/stages/test_atomic_io.py", "tests/pipeline/test_config.py")
ONNX = ("tests/stages/test_onnx_identity.py", "tests/stages/test_export.py::test_compare_outputs_follows_polygraphy")
TIMING = ("tests/stages/test_timing.py",)
DATASETS = ("tests/stages/test_datasets.py",)
RUNNER = ("tests/pipeline/test_runner.py",)
CACHE = ("tests/pipeline/test_cache.py", "tests/pipeline/test_runner.py")
SEEDS = ("tests/pipeline/test_seeds.py", "tests/pipeline/test_stats.py")
BENCHMARK = ("tests/stages/test_benchmark.py",)
REPORT = ("tests/pipeline/test_report.py",)
FIGURES = ("tests/pipeline/test_figures.py",)


def _m(id: str, path: str, what: str, tests: tuple[str, ...], *edits: tuple[str, str]) -> Mutation:
    return Mutation(id, path, what, tuple(edits), tests)


MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------ models/: the NORM maths
    _m("merge-residual", "models/merge.py", "merge forgets the residual identity", MERGE,
       ("a = a + torch.eye(", "a = a + 0 * torch.eye(")),
    _m("merge-shift", "models/merge.py", "merge drops the FT's final BN shift", MERGE,
       ("c = bn2.scale * (w2 @ bn1.shift) + bn2.shift", "c = bn2.scale * (w2 @ bn1.shift)")),
    _m("merge-eps", "models/merge.py", "BN affine without eps", MERGE,
       ("torch.sqrt(var + bn.eps)", "torch.sqrt(var)")),
    _m("merge-bias", "models/merge.py", "folded FC loses its own bias", MERGE,
       ("w_fc @ c + b_fc", "w_fc @ c")),
    _m("merge-train-mode", "models/merge.py", "merge accepts a BN in training mode", MERGE,
       ("    if bn.training:\n", "    if False:\n")),
    _m("merge-nonlinear-head", "models/merge.py", "merge accepts a non-linear head", MERGE,
       ("elif not isinstance(module, _PASS_THROUGH):", "elif False:")),
    _m("loss-norm-n", "models/losses.py", "NORM loss without the factor N", LOSSES,
       ("return n * functional.mse_loss(", "return functional.mse_loss(")),
    _m("loss-norm-nhwc-groups", "models/losses.py", "NHWC path groups channels as (C_t, N) instead of (N, C_t)",
       LOSSES, ("groups = expanded.permute(0, 2, 3, 1).reshape(b, h, w, n, ct)",
                "groups = expanded.permute(0, 2, 3, 1).reshape(b, h, w, ct, n).transpose(3, 4)")),
    _m("loss-kd-t2", "models/losses.py", "KD scaled by T instead of T^2", LOSSES,
       ("* temperature**2", "* temperature")),
    _m("loss-schedule-edge", "models/losses.py", "schedule pieces end inclusively", LOSSES,
       ("        if progress < end:", "        if progress <= end:")),
    _m("loss-multiplier", "models/losses.py", "NORM term ignores the schedule multiplier", LOSSES + DISTILL,
       ("alpha * norm_multiplier * norm_loss", "alpha * norm_loss")),
    _m("loss-align", "models/losses.py", "teacher map average- instead of max-pooled", LOSSES,
       ("functional.adaptive_max_pool2d", "functional.adaptive_avg_pool2d")),
    _m("ft-residual", "models/norm.py", "FT never adds the residual", FT,
       ("        if self.residual:\n            out = out + x", "        if False:\n            out = out + x")),
    _m("ft-bypassed", "models/norm.py", "NormStudent's head reads the untransformed features", FT,
       ("return self.student.forward_head(transformed), expanded", "return self.student.forward_head(features), expanded")),
    # ------------------------------------------------------------------ stages/lib/training.py and the distill stage
    _m("resume-weights", "stages/lib/training.py", "issue 18 bug 1: resume restores the optimizer, not the weights", TRAINING,
       ('        model.load_state_dict(state["model"])\n', "")),
    _m("resume-optimizer", "stages/lib/training.py", "resume restores the weights, not the optimizer", TRAINING,
       ('opt.load_state_dict(state["optimizer"])', "pass")),
    _m("resume-epoch", "stages/lib/training.py", "resume repeats the last finished epoch", TRAINING,
       ('state["epoch"] + 1, state["best_top1"]', 'state["epoch"], state["best_top1"]')),
    _m("lr-milestone", "stages/lib/training.py", "lr drops one epoch late", TRAINING + ("tests/pipeline/test_presets.py",),
       ("int(epoch) >= round(m * spec.epochs)", "int(epoch) > round(m * spec.epochs)")),
    _m("lr-cosine", "stages/lib/training.py", "cosine lr set once per epoch only", TRAINING + ("tests/pipeline/test_runner.py::test_cosine_lr_anneals_within_the_last_epoch",),
       ("return spec.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))", "return spec.lr * 0.5 * (1 + math.cos(math.pi * min(int(t), 1.0)))")),
    _m("eval-top1", "stages/lib/training.py", "top-1 counts top-5 hits", TRAINING,
       ("correct1 += (top[:, 0] == y).sum().item()", "correct1 += (top == y[:, None]).any(dim=1).sum().item()")),
    _m("fit-top1", "stages/lib/training.py", "fit reports the training accuracy as top-1", TRAINING,
       ('return {"top1": last.get("val_top1")', 'return {"top1": last.get("train_top1")')),
    _m("val-every-last", "stages/lib/training.py", "val_every skips the last epoch's evaluation", TRAINING,
       ("    last = epoch + 1 >= spec.epochs\n", "    last = False\n")),
    _m("val-every-unchecked", "stages/lib/training.py", "inf/NaN weights of an unevaluated epoch are checkpointed", TRAINING,
       ("    if ev is None and not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):",
        "    if False:")),
    _m("val-every-ignored", "stages/lib/training.py", "the stages' val_every never reaches fit()", DISTILL,
       ("return cls(**{k: getattr(c, k) for k in cls.__dataclass_fields__})",
        'return cls(**{k: getattr(c, k) for k in cls.__dataclass_fields__ if k != "val_every"})')),
    _m("val-every-eta", "stages/lib/eta.py", "the ETA prices an evaluation after every epoch whatever val_every says",
       ("tests/stages/test_eta.py",),
       ("(epochs_left if self.evals is None else self.evals)", "epochs_left")),
    _m("distill-schedule", "models/distillers.py", "issue 18 bug 7: distill ignores the NORM schedule", DISTILL,
       ("return norm_weight(epoch / self.epochs, self.norm_schedule)", "return 1.0")),
    _m("distill-progress", "models/distillers.py", "schedule read at the epoch number, not the fraction", DISTILL,
       ("return norm_weight(epoch / self.epochs, self.norm_schedule)", "return norm_weight(epoch, self.norm_schedule)")),
    # ------------------------------------------------------------------ stages/lib/io.py
    _m("atomic-in-place", "stages/lib/io.py", "issue 18 bug 6: atomic write done in place", IO,
       ('            with os.fdopen(fd, "wb") as raw:\n', '            os.close(fd)\n            with open(path, "wb") as raw:\n'),
       ("            os.replace(tmp, path)\n", "            Path(tmp).unlink()\n")),
    _m("atomic-no-cleanup", "stages/lib/io.py", "a failed write leaves its temp file", IO,
       ("                Path(tmp).unlink(missing_ok=True)\n", "                pass\n")),
    _m("atomic-signals", "stages/lib/io.py", "Ctrl-C no longer deferred during a write", IO,
       ("    with _signals_deferred():\n", "    with contextlib.nullcontext():\n")),
    _m("atomic-mode", "stages/lib/io.py", "artifacts keep mkstemp's 0600", IO,
       ("os.fchmod(fd, 0o666 & ~_UMASK)", "pass")),
    # ------------------------------------------------------------------ stages/lib/onnx_utils.py
    _m("graph-ops", "stages/lib/onnx_utils.py", "issue 18 bug 5: graph identity ignores operators", ONNX,
       ('"ops_equal": a["ops"] == b["ops"]', '"ops_equal": True')),
    _m("graph-attrs", "stages/lib/onnx_utils.py", "issue 18 bug 5: graph identity ignores attributes", ONNX,
       ('"attrs_equal": a["attrs"] == b["attrs"]', '"attrs_equal": True')),
    _m("graph-attrs-unread", "stages/lib/onnx_utils.py", "signature records no attributes", ONNX,
       ('"attrs": [_plain_attrs(n) for n in g.node]', '"attrs": []')),
    _m("graph-order", "stages/lib/onnx_utils.py", "operators compared as a multiset", ONNX,
       ('"ops": [n.op_type for n in g.node]', '"ops": sorted(n.op_type for n in g.node)')),
    _m("graph-io", "stages/lib/onnx_utils.py", "graph identity ignores inputs and outputs", ONNX,
       ('"io_equal": a["inputs"] == b["inputs"] and a["outputs"] == b["outputs"]', '"io_equal": True')),
    _m("parity-or", "stages/lib/onnx_utils.py", "parity fails on atol OR rtol (not Polygraphy's AND)", ONNX,
       ("failed = (diff > atol) & (diff > rtol * np.abs(expected))", "failed = (diff > atol) | (diff > rtol * np.abs(expected))")),
    # ------------------------------------------------------------------ stages/lib/timing.py
    _m("timing-unpaired", "stages/lib/timing.py", "bootstrap resamples the pairs independently", TIMING,
       ("ib = ia if paired else", "ib = rng.integers(0, b.size, size=(n_boot, b.size)) if paired else")),
    _m("timing-ratio", "stages/lib/timing.py", "ratio inverted (reference / candidate)", TIMING,
       ("return float(np.median(b) / np.median(a)), float(lo), float(hi)", "return float(np.median(a) / np.median(b)), float(lo), float(hi)")),
    _m("timing-verdict", "stages/lib/timing.py", "verdict needs only one end inside the band", TIMING,
       ("return (1 - band) <= lo <= hi <= (1 + band)", "return (1 - band) <= lo or hi <= (1 + band)")),
    _m("timing-no-mirror", "stages/lib/schedule.py", "ABBA rounds not mirrored", TIMING,
       ("        yield [models[i] for i in reversed(row)]\n", "        yield [models[i] for i in row]\n")),
    # a 90% interval labelled 95% makes a "cost unchanged: yes" easier to get; killed by the coverage test
    _m("timing-ci-level", "stages/lib/timing.py", "a 90% interval reported as 95%", TIMING,
       ("    tail = (1 - level) / 2 * 100\n    lo, hi = np.percentile(boot, [tail, 100 - tail])\n    return {\"ratio\": math.exp",
        "    tail = (1 - level) / 2 * 100\n    lo, hi = np.percentile(boot, [2 * tail, 100 - 2 * tail])\n    return {\"ratio\": math.exp")),
    # ------------------------------------------------------------------ stages/lib/datasets.py
    _m("data-no-std", "stages/lib/datasets.py", "normalisation forgets the std", DATASETS,
       ("(x_uint8.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)", "x_uint8.float().div_(255.0) - mean.view(1, -1, 1, 1)")),
    _m("data-channel-stats", "stages/lib/datasets.py", "one mean/std over all channels", DATASETS,
       ("    dims = [0, 2, 3]\n    return x.mean(dims).tolist(), x.std(dims).tolist()",
        "    dims = [0, 1, 2, 3]\n    return [x.mean().item()] * x.shape[1], [x.std().item()] * x.shape[1]")),
    _m("data-no-shard-pad", "stages/lib/datasets.py", "ranks take unequal step counts", DATASETS,
       ("idx = torch.cat([idx, idx[: -n % self.world_size]])", "pass")),
    _m("data-same-order", "stages/lib/datasets.py", "the same shuffle every epoch", DATASETS,
       ("manual_seed(self.seed * 100003 + self.epoch)", "manual_seed(self.seed * 100003)")),
    _m("data-val-shuffled", "stages/lib/datasets.py", "validation split shuffled", DATASETS,
       ("val = TensorSplit(xv, yv, batch_size=eval_batch_size,", "val = TensorSplit(xv, yv, shuffle=True, batch_size=eval_batch_size,")),
    # ------------------------------------------------------------------ pipeline/runner.py (caching)
    _m("code-hash", "pipeline/codehash.py", "issue 18 bug 4: the import closure stops at the stage module", CACHE,
       ("                    todo.extend(self._imports_of(path, name))\n", "                    pass\n")),
    _m("fp-config", "pipeline/plan.py", "fingerprint ignores the stage's config", CACHE,
       ('        "config": {path: cfg.section(path) for path in spec.config},\n', '        "config": None,\n')),
    _m("fp-inputs", "pipeline/plan.py", "fingerprint ignores the inputs' hashes", CACHE,
       ('"inputs": {n: (r or {}).get("outputs") if', '"inputs": {n: None if')),
    _m("cache-modified", "pipeline/plan.py", "a tampered artifact is served from cache", CACHE,
       ('        if self.modified(name):\n            return "modified"\n', "")),
    _m("state-upstream", "pipeline/plan.py", "status ignores stale inputs", CACHE,
       ("        if any(self.state(d) in OUT_OF_DATE for d in spec.inputs):", "        if any(False for d in spec.inputs):")),
    _m("work-reuse", "pipeline/runner.py", "resumes from another configuration's leftovers", ("tests/pipeline/test_resume_state.py",) + RUNNER,
       ("if work.exists() and (force or not marker.is_file() or marker.read_text() != fp):", "if work.exists() and force:")),
    # ------------------------------------------------------------------ the benchmark stage (stages/lib/latency*.py)
    _m("bench-pair", "stages/lib/latency.py", "issue 18 bug 2: merged_vs_vanilla timed on vanilla_b/vanilla", BENCHMARK,
       ('("merged_vs_vanilla", "merged", "vanilla")', '("merged_vs_vanilla", "vanilla_b", "vanilla")')),
    _m("bench-verdict-aa", "stages/lib/latency_verdict.py", "verdict taken from the A/A control", BENCHMARK,
       ('answer, reason = timing.decide(mv, band, control=aa, name="merged/vanilla")',
        'answer, reason = timing.decide(aa, band, control=aa, name="merged/vanilla")')),
    _m("bench-batch", "stages/lib/latency_verdict.py", "verdict at the smallest batch", BENCHMARK,
       ('key=lambda c: c["batch"])', 'key=lambda c: -c["batch"])')),
    _m("bench-clock", "stages/lib/latency_verdict.py", "verdict always by wall clock", BENCHMARK,
       ('used = "cpu" if clock == "cpu" and vcell.get("cpu_comparisons") else "wall"', 'used = "wall"')),
    _m("bench-plot-p90", "stages/lib/latency_report.py", "latency.png bars show p90, not the median", BENCHMARK + FIGURES,
       ('s["median_ms"], width', 's["p90_ms"], width')),
    # ------------------------------------------------------------------ pipeline/report.py and its figures
    _m("report-helped", "pipeline/stats.py", "issue 18 bug 3: norm_helped inverted", SEEDS + REPORT,
       ('    if diff["lo"] > 0:\n        return "yes"', '    if diff["hi"] < 0:\n        return "yes"')),
    _m("report-delta-sign", "pipeline/report.py", "deltas computed baseline minus model", REPORT,
       ("return None if a is None or b is None else (a - b) * 100", "return None if a is None or b is None else (b - a) * 100")),
    _m("report-merge-exact", "pipeline/report.py", "merge_exact yes whenever verify ran", REPORT,
       ('(vjson.get("passed") is True) if run.done("verify")', 'True if run.done("verify")')),
    _m("report-cost", "pipeline/report.py", "cost_unchanged yes on a 'no' verdict", REPORT,
       ('{"yes": True, "no": False}.get(cost)', '{"yes": True, "no": True}.get(cost)')),
    _m("report-best", "stages/lib/accuracy.py", "NORM top-1 taken from the best epoch", REPORT,
       ('("norm_top1", "distill", "top1")', '("norm_top1", "distill", "best_top1")')),
    _m("curves-scale", "pipeline/report_html.py", "top-1 curves plotted as fractions", FIGURES,
       ('r["val_top1"] * 100 for r in rows]', 'r["val_top1"] for r in rows]')),
    _m("forest-series", "pipeline/report_html.py", "forest plot draws the A/A interval as merged", FIGURES,
       ('(("merged_vs_vanilla", "merged", "#059669"), ("aa", "A/A control", "#64748b")',
        '(("aa", "merged", "#059669"), ("merged_vs_vanilla", "A/A control", "#64748b")')),
    # ------------------------------------------------------------------ bundle verification (stages/lib/bundle_check.py)
    _m("bundle-engine-check", "stages/lib/bundle_check.py", "verify_bundle never checks engines against the machine",
       ("tests/stages/test_bundle.py",), ("            trt_rules.check_compatibility(side, info)\n", "            pass\n")),
]
