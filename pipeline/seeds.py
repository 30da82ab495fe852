"""Several seeds for one run: ``run --seeds 0,1,2`` and the seed statistics of its "Did NORM help?" verdict.

The seed varies the student side only (``student.seed``: the student's initial weights and its data order, the
same for the baseline and the NORM student, so the two are paired by seed); the teacher keeps ``run.seed`` and
is trained once. The run directory holds the first seed's full pipeline; every other seed gets
``<run>/seeds/seed=<s>/`` with data, teacher, baseline and distill, data and teacher restored from the stage cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from pipeline import graph
from pipeline.stats import helped_verdict, mean_ci, paired
from stages.lib.errors import PipelineError

SEEDS_DIR = "seeds"
STUDENT_STAGES = ("baseline", "distill")  # what a seed changes
COMPARED = ("baseline", "distill")


def parse_seeds(text: str, option: str = "--seeds") -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); a clear error for anything else."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        seeds = tuple(int(p) for p in parts)
    except ValueError:
        raise PipelineError(f"{option} {text!r}: expected comma-separated integers, e.g. {option} 0,1,2") from None
    if not seeds:
        raise PipelineError(f"{option}: give at least one seed, e.g. {option} 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise PipelineError(f"{option} {text!r}: a seed is listed twice")
    if any(s < 0 for s in seeds):
        raise PipelineError(f"{option} {text!r}: seeds must be >= 0")
    return seeds


def student_seed_override(overrides: tuple[str, ...], seed: int) -> tuple[str, ...]:
    """``overrides`` plus ``student.seed=<seed>`` (what torchrun children and config.yaml must see too)."""
    if any(o.split("=", 1)[0].strip() == "student.seed" for o in overrides):
        raise PipelineError("--seeds and --set student.seed both set the student's seed: use one of them")
    return tuple(overrides) + (f"student.seed={seed}",)


def seed_dir(run_dir: Path, seed: int) -> Path:
    return Path(run_dir) / SEEDS_DIR / f"seed={seed}"


def with_seed(cfg, seed: int):
    """A copy of ``cfg`` whose student side uses ``seed``."""
    out = cfg.model_copy(deep=True)
    out.student.seed = seed
    return out


def stages_through(to_stage: str) -> list[str]:
    """The stages a seed or a sweep combination runs: everything up to ``to_stage``, which must reach distill."""
    from pipeline.runner import select

    names = select(None, to_stage)
    if not set(COMPARED) <= set(names):
        raise PipelineError(f"comparing seeds needs the baseline and distill stages: --to {to_stage} stops before them "
                            f"(use --to distill or a later stage)")
    return names


def describe(result) -> str:
    if result.status == "restored":
        return result.reason
    from pipeline.session import _describe

    return _describe(result)


def run_derived(cfg, run_dir: Path, names: list[str], cache, *, nproc: int = 1, config_path: Optional[str] = None,
                overrides: tuple[str, ...] = (), fresh: tuple[str, ...] = (), log: Callable[[str], None] = print,
                prefix: str = "") -> list:
    """Run ``names`` in ``run_dir`` under its lock, sharing finished stages through ``cache``; the results.

    ``overrides`` must reproduce ``cfg`` from ``config_path`` (torchrun children load the config themselves).
    """
    from pipeline.runner import Runner
    from pipeline.session import _run_torchrun
    from pipeline.stagecache import run_shared

    runner = Runner(cfg, run_dir, log=log)
    runner.rd.lock()
    try:
        runner.save_config()

        def run_one(name: str):
            force = name in fresh
            if nproc > 1 and graph.get(name).distributed:
                return _run_torchrun(runner, name, nproc, force, config_path, overrides, run_dir)
            return runner.run_stage(name, force=force)

        results = []
        for r in run_shared(runner, names, cache, run_one=run_one, fresh=fresh):
            log(f"{prefix}{r.name}: {describe(r)}")
            results.append(r)
        return results
    finally:
        runner.rd.unlock()


def run_seeds(runner, seeds: tuple[int, ...], *, nproc: int = 1, force: bool = False, config_path: Optional[str] = None,
              overrides: tuple[str, ...] = (), log: Callable[[str], None] = print) -> None:
    """Train baseline and distill for each of ``seeds`` next to ``runner``'s run (whose teacher they share)."""
    from pipeline.stagecache import CACHE_DIR, StageCache

    names = stages_through("distill")
    cache = StageCache(runner.rd.path / CACHE_DIR)
    cache.adopt(runner.rd, names)
    for i, s in enumerate(seeds, 1):
        log(f"── seed {s} ({i}/{len(seeds)}): baseline and NORM student with student.seed={s}, the same teacher")
        run_derived(with_seed(runner.cfg, s), seed_dir(runner.rd.path, s), names, cache, nproc=nproc,
                    config_path=config_path, overrides=tuple(overrides) + (f"student.seed={s}",),
                    fresh=STUDENT_STAGES if force else (), log=log, prefix=f"seed {s} · ")


# ----------------------------------------------------------------------------- statistics for the report
def _stale_reason(path: Path) -> Optional[str]:
    """None when baseline and distill in ``path`` are up to date with its config.yaml and today's code."""
    import yaml

    from pipeline.config import PipelineConfig
    from pipeline.runner import Runner

    try:
        cfg = PipelineConfig.model_validate(yaml.safe_load((Path(path) / "config.yaml").read_text()) or {})
    except Exception:  # noqa: BLE001 - missing, unreadable or invalid: cannot vouch for the records
        return "no valid config.yaml"
    runner = Runner(cfg, path, log=lambda m: None)
    for name in COMPARED:
        state = runner.state(graph.get(name))
        if state != "done":
            return f"its {name} stage is {state}"
    return None


def _without_seed(rec: dict) -> dict:
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in (rec.get("config") or {}).items()}
    if isinstance(cfg.get("student"), dict):
        cfg["student"].pop("seed", None)
    return {"config": cfg, "inputs": rec.get("inputs")}


def _figures(run) -> dict:
    m = run.metrics
    return {"norm_top1": m("distill").get("top1"), "baseline_ce_top1": m("baseline").get("ce_top1")}


def seed_summary(run) -> dict:
    """The paired NORM − baseline difference over this run's seed and its comparable seed folders.

    A seed folder counts when its baseline and distill ran with this run's config (the seed aside), on the same
    data and teacher (same input hashes), and both runs are up to date with today's code; others are listed
    under ``excluded`` with the reason.
    """
    from pipeline.report import Run

    rows, excluded = [], []
    main_seed = run.cfg("student.seed")
    if main_seed is None:
        main_seed = run.cfg("run.seed", 0)
    main_ok = run.done("baseline") and run.done("distill")
    if main_ok:
        rows.append({"seed": main_seed, "dir": ".", **_figures(run)})
    folders = sorted((run.path / SEEDS_DIR).glob("seed=*"), key=lambda p: p.name) if (run.path / SEEDS_DIR).is_dir() else []
    main_stale = _stale_reason(run.path) if main_ok and folders else None
    for d in folders:
        rel = d.relative_to(run.path).as_posix()
        try:
            seed = int(d.name.split("=", 1)[1])
        except ValueError:
            continue
        sub = Run.load(d)
        why = None
        if not main_ok:
            why = "this run's baseline or distill has not run"
        elif main_stale:
            why = f"this run is not up to date ({main_stale})"
        elif seed == main_seed:
            why = "same seed as this run"
        elif not (sub.done("baseline") and sub.done("distill")):
            why = "baseline or distill not finished"
        elif any(_without_seed(sub.records[s] or {}) != _without_seed(run.records[s] or {}) for s in COMPARED):
            why = "trained with another config, data or teacher"
        else:
            why = _stale_reason(d)
        if why:
            excluded.append({"seed": seed, "dir": rel, "reason": why})
        else:
            rows.append({"seed": seed, "dir": rel, **_figures(sub)})
    rows = [r for r in rows if r["norm_top1"] is not None and r["baseline_ce_top1"] is not None]
    for r in rows:
        r["diff_pts"] = (r["norm_top1"] - r["baseline_ce_top1"]) * 100
    diffs = paired({r["seed"]: r["norm_top1"] for r in rows}, {r["seed"]: r["baseline_ce_top1"] for r in rows})
    diff = mean_ci([d * 100 for _, d in diffs])
    verdict, why = helped_verdict(diff)
    return {"n": len(rows), "seeds": [r["seed"] for r in rows], "rows": rows,
            "norm_top1": mean_ci(r["norm_top1"] for r in rows),
            "baseline_ce_top1": mean_ci(r["baseline_ce_top1"] for r in rows),
            "diff_pts": diff, "verdict": verdict, "why": why, "excluded": excluded}
