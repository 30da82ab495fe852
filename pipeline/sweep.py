"""``norm-pipeline sweep``: every combination of --grid values x --seeds as its own run, compared with CIs.

Each combination is an ordinary run directory, ``<run>/sweep/<n=2_alpha=0.5_seed=0>/``. Finished stages are
shared through the stage cache (``<run>/.stage-cache``, keyed by fingerprint), seeded with the parent run's
stages: when only student-side keys vary, every combination has the same teacher fingerprint, so the teacher
trains once; the baseline's fingerprint ignores ``distill.*``, so it trains once per seed. A killed sweep
resumes (each run directory resumes), a repeated one only checks fingerprints.

Outputs in ``<run>/sweep/``: ``sweep.json`` (every figure), ``sweep.html`` (same style as report.html) and the
table printed at the end.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline import __version__
from pipeline.stats import fmt_mean_ci, helped_verdict, mean_ci, paired
from stages.lib.errors import PipelineError

SWEEP_DIR, SWEEP_JSON, SWEEP_HTML = "sweep", "sweep.json", "sweep.html"
NOT_SWEPT = {"student.seed": "vary it with --seeds", "run.name": "the sweep lives under one run", "run.root": "the sweep "
             "lives under one run"}


@dataclass
class Planned:
    """One run of the sweep: a combination of grid values, a seed, its config and its folder."""

    combo: dict[str, Any]  # key -> value (YAML-typed)
    raw: dict[str, str]  # key -> value as typed on the command line
    seed: int
    label: str  # "n=2, alpha=0.5"
    slug: str  # "n=2_alpha=0.5_seed=0"
    cfg: Any = None
    overrides: tuple[str, ...] = field(default=())


def split_values(text: str) -> list[str]:
    """'2,4,8' -> ['2', '4', '8']; commas inside [...] or {...} stay (``--grid benchmark.batch_sizes=[1,8],[32]``)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def parse_grid(items: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """``("distill.n=2,4", ...)`` -> ``{"distill.n": ["2", "4"]}`` in the order given; clear errors otherwise."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or "." not in key or not values.strip():
            raise PipelineError(f"--grid {item!r}: expected section.key=value1,value2,..., e.g. --grid distill.n=2,4,8")
        if key in NOT_SWEPT:
            raise PipelineError(f"--grid {key}: cannot be swept ({NOT_SWEPT[key]})")
        if key in grid:
            raise PipelineError(f"--grid {key} is given twice; list all its values once: --grid {key}=a,b,c")
        vals = split_values(values)
        if any(not v for v in vals) or len(set(vals)) != len(vals):
            raise PipelineError(f"--grid {item!r}: empty or repeated value")
        grid[key] = vals
    return grid


def _short_names(keys: list[str]) -> dict[str, str]:
    """'distill.n' -> 'n' unless two keys end the same way (then the full path)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _slug_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def plan(config_path: Optional[str], overrides: tuple[str, ...], grid: dict[str, list[str]], seeds: tuple[int, ...]) -> list[Planned]:
    """Every (combination, seed) with its validated config; an invalid value fails here, before anything runs."""
    import yaml

    from pipeline.config import load_config

    keys = list(grid)
    short = _short_names(keys)
    user_sets_seed = any(o.split("=", 1)[0].strip() == "student.seed" for o in overrides)
    out, slugs = [], set()
    for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        raw = dict(zip(keys, values, strict=True))
        label = ", ".join(f"{short[k]}={v}" for k, v in raw.items()) or "config"
        for seed in seeds:
            ovr = tuple(overrides) + tuple(f"{k}={v}" for k, v in raw.items())
            if not user_sets_seed:
                ovr += (f"student.seed={seed}",)
            try:
                cfg = load_config(config_path, ovr)
            except PipelineError as e:
                raise PipelineError(f"sweep combination {label}, seed {seed}: {e}") from None
            slug = "_".join([*(f"{_slug_part(short[k])}={_slug_part(v)}" for k, v in raw.items()), f"seed={seed}"])
            if slug in slugs:
                raise PipelineError(f"--grid values {label} give the same folder name as another combination ({slug}); "
                                    "use values that differ in letters or digits")
            slugs.add(slug)
            combo = {k: yaml.safe_load(v) for k, v in raw.items()}
            student_seed = cfg.student.seed if cfg.student.seed is not None else cfg.run.seed  # resolved on load
            out.append(Planned(combo, raw, student_seed, label, slug, cfg, ovr))
    return out


def run_sweep(cfg, run_dir: Path, *, grid: tuple[str, ...], seeds: Optional[str], to_stage: str = "distill",
              nproc: int = 1, config_path: Optional[str] = None, overrides: tuple[str, ...] = (),
              log: Optional[Callable[[str], None]] = None) -> dict:
    """Run (or resume) every combination, then write sweep.json + sweep.html and print the table; the sweep data."""
    from pipeline.rundir import RunDir
    from pipeline.seeds import parse_seeds, run_derived, stages_through, student_seed_override
    from pipeline.session import console
    from pipeline.stagecache import CACHE_DIR, StageCache

    if log is None:
        from pipeline.session import _log

        log = _log
    names = stages_through(to_stage)
    if seeds is not None:
        seed_list = parse_seeds(seeds)
        student_seed_override(overrides, seed_list[0])  # refuses --set student.seed next to --seeds
    else:
        seed_list = (cfg.student.seed,)
    g = parse_grid(grid)
    runs = plan(config_path, tuple(overrides), g, seed_list)
    run_dir = Path(run_dir)
    root = RunDir(run_dir / SWEEP_DIR)
    root.lock()
    try:
        cache = StageCache(run_dir / CACHE_DIR)
        if (run_dir / names[0]).is_dir():
            cache.adopt(RunDir(run_dir), names)  # a teacher the parent run already trained is not trained again
        for i, p in enumerate(runs, 1):
            console.rule(f"[bold]sweep {i}/{len(runs)}[/] — {p.label} · seed {p.seed}")
            run_derived(p.cfg, root.path / p.slug, names, cache, nproc=nproc, config_path=config_path,
                        overrides=p.overrides, log=log, prefix=f"[{i}/{len(runs)}] ")
        data = collect(root.path, runs, g, seed_list, names, config_path, overrides)
        write(root.path, data)
    finally:
        root.unlock()
    console.print(terminal_table(data))
    log(f"sweep: {root.path / SWEEP_HTML}  ({root.path / SWEEP_JSON})")
    return data


# ----------------------------------------------------------------------------- results
def _run_figures(path: Path, names: list[str]) -> dict:
    from pipeline.rundir import RunDir

    rd = RunDir(path)
    recs = {n: rd.record(n) for n in names}
    m = {n: (r or {}).get("metrics") or {} if (r or {}).get("status") == "done" else {} for n, r in recs.items()}
    stages = {n: None if r is None else {"status": r.get("status"), "fingerprint": r.get("fingerprint"),
                                           "trained_in": r.get("origin") or str(path), "restored": "restored" in r}
              for n, r in recs.items()}
    return {"teacher_top1": m.get("teacher", {}).get("top1"), "baseline_ce_top1": m.get("baseline", {}).get("ce_top1"),
            "norm_top1": m.get("distill", {}).get("top1"), "stages": stages}


def collect(root: Path, runs: list[Planned], grid: dict, seeds: tuple[int, ...], names: list[str],
            config_path: Optional[str], overrides: tuple[str, ...]) -> dict:
    """sweep.json's content: every run's figures, and per combination mean ± 95% CI over seeds."""
    import yaml

    rows = [{"combo": p.combo, "label": p.label, "seed": p.seed, "dir": p.slug, **_run_figures(root / p.slug, names)}
            for p in runs]
    combos: list[dict] = []
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        done = [r for r in mine if r["norm_top1"] is not None and r["baseline_ce_top1"] is not None]
        diff = mean_ci(d * 100 for _, d in paired({r["seed"]: r["norm_top1"] for r in done},
                                                    {r["seed"]: r["baseline_ce_top1"] for r in done}))
        verdict, why = helped_verdict(diff)
        combos.append({"label": label, "combo": mine[0]["combo"], "seeds": [r["seed"] for r in done], "n": len(done),
                       "planned": len(mine), "norm_top1": mean_ci(r["norm_top1"] for r in done),
                       "baseline_ce_top1": mean_ci(r["baseline_ce_top1"] for r in done),
                       "teacher_top1": mean_ci(r["teacher_top1"] for r in done if r["teacher_top1"] is not None),
                       "diff_pts": diff, "verdict": verdict, "why": why, "best": False})
    ranked = [c for c in combos if c["norm_top1"]["mean"] is not None]
    best = max(ranked, key=lambda c: c["norm_top1"]["mean"]) if ranked else None
    if best is not None:
        best["best"] = True
    trained = {n: sorted({t for r in rows if r["stages"].get(n) and (t := (r["stages"][n] or {}).get("trained_in")) is not None})
               for n in names}
    return {"sweep_dir": str(root), "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "norm_pipeline_version": __version__, "config": config_path, "overrides": list(overrides),
            "grid": {k: [yaml.safe_load(x) for x in v] for k, v in grid.items()},
            "seeds": list(seeds), "stages": names, "runs": rows, "combinations": combos,
            "best": best["label"] if best else None,
            "best_rule": "highest mean NORM top-1 over seeds", "trained_in": trained}


def write(root: Path, data: dict) -> None:
    from pipeline import sweep_html
    from stages.lib.io import atomic_write_text

    atomic_write_text(root / SWEEP_JSON, json.dumps(data, indent=2, default=str) + "\n")
    atomic_write_text(root / SWEEP_HTML, sweep_html.render(data))


def terminal_table(data: dict):
    """The comparison as a rich table: one row per combination, the best one starred."""
    from rich.table import Table

    word = {"yes": "[green]yes[/]", "no": "[red]no[/]", "inconclusive": "[yellow]inconclusive[/]", None: "[dim]n/a[/]"}
    t = Table(title=f"sweep {data['sweep_dir']} — mean ± 95% CI over seeds (Student t)", title_justify="left")
    right = ("seeds", "NORM top-1", "student alone", "NORM − alone, pts [95% CI]")
    for col in ("", "combination", *right, "NORM helped"):
        t.add_column(col, justify="right" if col in right else "left")
    for c in data["combinations"]:
        t.add_row("★" if c["best"] else "", c["label"], f"{c['n']}/{c['planned']}",
                  fmt_mean_ci(c["norm_top1"], 100, "%"), fmt_mean_ci(c["baseline_ce_top1"], 100, "%"),
                  fmt_mean_ci(c["diff_pts"], signed=True), word.get(c["verdict"], c["verdict"]),
                  style="bold" if c["best"] else None)
    return t
