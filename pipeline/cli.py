"""``norm-pipeline``: run the whole pipeline, one stage, or look at a run directory."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import click

from pipeline import __version__

DEFAULT_CONFIG = "pipeline.yaml"
LOCK_HELD_ENV = "NORM_PIPELINE_LOCK_HELD"


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def _load(config: Optional[str], overrides: tuple[str, ...], run_dir: Optional[str]):
    from pipeline.config import load_config

    path = config if config is not None else (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    cfg = load_config(path, overrides)
    rd = Path(run_dir) if run_dir else cfg.run.root / cfg.run.name
    return cfg, rd


def guarded(fn):
    """User errors -> one line + exit 2; Ctrl-C/SIGTERM -> a resume hint + exit 130; bugs keep their traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from stages.lib.errors import PipelineError

        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            _fail(str(e))
        except OSError as e:  # a full disk outside the stages' own writers: one line, not a traceback
            from stages.lib.io import disk_full, no_space_error

            if no_space_error(e) is None:
                raise
            _fail(str(disk_full(e.filename or "the run directory", e)))
        except KeyboardInterrupt:
            click.echo("\ninterrupted: finished stages and epochs are kept; run the same command again to resume", err=True)
            sys.exit(130)

    return wrapper


config_option = click.option("-c", "--config", type=click.Path(dir_okay=False), default=None,
                             help=f"pipeline YAML (overrides only; default: ./{DEFAULT_CONFIG} if present)")
set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="override one config value, e.g. --set distill.epochs=3 (repeatable)")
run_dir_option = click.option("--run-dir", type=click.Path(file_okay=False), default=None,
                              help="run directory (default: <run.root>/<run.name>, i.e. runs/default)")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="norm-pipeline")
def main() -> None:
    """NORM knowledge distillation, from teacher to an edge-ready bundle.

    Stages: data -> teacher -> baseline, distill -> merge -> verify -> export -> engine -> benchmark -> bundle.
    Every stage writes into runs/<name>/<stage>/ with a record; unchanged stages are skipped (cached).
    """


@main.command()
@config_option
@run_dir_option
@set_option
@click.option("--from", "from_stage", default=None, help="first stage to run (earlier ones must be done)")
@click.option("--to", "to_stage", default=None, help="last stage to run")
@click.option("--force", is_flag=True, help="re-run the selected stages even when cached")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="processes per host for the training stages (launches torchrun; gloo on CPU, nccl on CUDA)")
@click.option("--seeds", default=None, metavar="S1,S2,...",
              help="student seeds, e.g. 0,1,2: the run uses the first; baseline and distill are also trained for the "
                   "others (teacher once) and 'NORM helped' reports the paired difference with its 95% CI")
@guarded
def run(config, run_dir, overrides, from_stage, to_stage, force, nproc, seeds) -> None:
    """Run the pipeline (or the --from/--to slice of it)."""
    from pipeline.session import run_pipeline

    seed_list: tuple[int, ...] = ()
    if seeds is not None:
        from pipeline.seeds import parse_seeds, student_seed_override

        seed_list = parse_seeds(seeds)
        overrides = student_seed_override(overrides, seed_list[0])
    cfg, rd = _load(config, overrides, run_dir)
    run_pipeline(cfg, rd, from_stage=from_stage, to_stage=to_stage, force=force, nproc=nproc,
                 config_path=config, overrides=overrides, seeds=seed_list)


@main.command()
@config_option
@run_dir_option
@set_option
@click.option("--grid", "grid", multiple=True, metavar="SECTION.KEY=V1,V2,...",
              help="a swept key and its values, e.g. --grid distill.n=2,4,8 (repeatable: every combination runs)")
@click.option("--seeds", default=None, metavar="S1,S2,...",
              help="student seeds per combination, e.g. 0,1,2 (default: the config's student seed)")
@click.option("--to", "to_stage", default="distill", show_default=True, help="last stage of every combination")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="processes per host for the training stages (launches torchrun; gloo on CPU, nccl on CUDA)")
@guarded
def sweep(config, run_dir, overrides, grid, seeds, to_stage, nproc) -> None:
    """Run every combination of --grid values x --seeds under <run-dir>/sweep/ and compare them.

    Finished stages are shared between combinations (a stage cache keyed by fingerprint): when only
    student-side keys vary, the teacher trains once and the baseline once per seed. Writes sweep.json and
    sweep.html (mean and 95% CI over seeds per combination); a killed sweep resumes, a repeated one is instant.
    """
    from pipeline.sweep import run_sweep

    cfg, rd = _load(config, overrides, run_dir)
    path = config if config is not None else (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    run_sweep(cfg, rd, grid=grid, seeds=seeds, to_stage=to_stage, nproc=nproc, config_path=path, overrides=overrides)


@main.command()
@click.argument("name")
@config_option
@run_dir_option
@set_option
@click.option("--force", is_flag=True, help="re-run even when cached")
@guarded
def stage(name, config, run_dir, overrides, force) -> None:
    """Run one stage NAME (its inputs must be current), then refresh report.html and summary.json.

    Works under torchrun for training stages."""
    from pipeline.session import run_single

    cfg, rd = _load(config, overrides, run_dir)
    run_single(cfg, rd, name, force=force, take_lock=os.environ.get(LOCK_HELD_ENV) != "1")


@main.command()
@config_option
@run_dir_option
@set_option
@guarded
def status(config, run_dir, overrides) -> None:
    """Table of stages: done / stale / skipped / missing / interrupted / modified; exits 1 if files were tampered with."""
    from pipeline.session import print_status

    cfg, rd = _load(config, overrides, run_dir)
    tampered = print_status(cfg, rd)
    if tampered:
        _fail(f"files of {', '.join(tampered)} no longer match their records; run `norm-pipeline run` to rebuild "
              "them (or restore the files)", code=1)


@main.command()
@config_option
@run_dir_option
@set_option
@guarded
def report(config, run_dir, overrides) -> None:
    """Write report.html and summary.json for a run directory (every `run` also does) and print the verdicts."""
    import json

    from rich.console import Console

    from pipeline.report import SUMMARY, terminal_summary, write_report
    from stages.lib.errors import PipelineError

    _, rd = _load(config, overrides, run_dir)
    if not rd.is_dir():
        raise PipelineError(f"run directory {rd} does not exist; run `norm-pipeline run` first or pass --run-dir")
    path = write_report(rd)
    Console(highlight=False).print(terminal_summary(json.loads((rd / SUMMARY).read_text())))
    click.echo(f"report: {path}")


@main.command(name="list")
def list_stages() -> None:
    """List the stages and what each reads and writes."""
    from pipeline.session import print_stage_list

    print_stage_list()


@main.command(name="config")
@config_option
@set_option
@click.option("--defaults", is_flag=True, help="print every key with its default instead")
@guarded
def show_config(config, overrides, defaults) -> None:
    """Print the resolved config (defaults <- YAML <- --set)."""
    from pipeline.config import PipelineConfig, dump_config

    cfg = PipelineConfig() if defaults else _load(config, overrides, None)[0]
    click.echo(dump_config(cfg), nl=False)


@main.group()
def bundle() -> None:
    """Work with edge bundles."""


@bundle.command(name="verify")
@click.argument("path", type=click.Path(exists=True))
@click.option("--strict", is_flag=True,
              help="also fail when an engine cannot load on this machine (run it on the target device)")
@guarded
def bundle_verify(path, strict) -> None:
    """Check every file hash of a bundle folder or .tar.gz, engine compatibility with this machine, and run the
    bundle's ONNX self-test (golden images vs the pipeline's logits) for every shipped precision."""
    from stages.lib.bundle_check import integrity_errors, verify_bundle

    problems = verify_bundle(Path(path), selftest=True)
    errors = integrity_errors(problems)
    engines = [p.message for p in problems if strict and p.severity == "warning"]
    for p in problems:
        click.echo(str(p), err=True)
    if errors:
        _fail(f"bundle {path} failed verification: {len(errors)} problem(s), first: {errors[0]}; do not deploy it: "
              "copy the bundle again from its source, or rebuild it with `norm-pipeline stage bundle --force`", code=1)
    if engines:
        _fail(f"bundle {path} is intact, but an engine cannot run on this machine: {engines[0]}", code=1)
    tested = not any("self-test did not run" in p.message or "no golden self-test" in p.message for p in problems)
    click.echo(f"bundle {path}: OK (all hashes match{'; ONNX self-test passed' if tested else ''})")


@bundle.command(name="ingest")
@click.argument("report", type=click.Path(exists=True, dir_okay=False))
@config_option
@run_dir_option
@set_option
@guarded
def bundle_ingest(report, config, run_dir, overrides) -> None:
    """Store a device report (run_onnx.py/run_trt.py --report) under the run that made its bundle; the run's
    report.html then shows it under "measured on device". Refuses a report made with another bundle's model."""
    from pipeline.devices import ingest
    from pipeline.report import write_report

    _, rd = _load(config, overrides, run_dir)
    stored, summary = ingest(Path(report), rd)
    click.echo(f"ingested {report} as {stored}: {summary}")
    click.echo(f"report: {write_report(rd)}")


if __name__ == "__main__":
    main()
