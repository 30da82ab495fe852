#!/usr/bin/env python3
"""Mutation testing: do the tests fail when the code is wrong?

Applies each mutation of scripts/mutations.py alone to a private copy of the source tree (never to this
checkout), runs only the tests listed for it there, and reports it killed (a test failed) or survived (every
test passed: the suite would let that bug ship). The unmutated tests are run first, so a failure already
present is not mistaken for a kill. Not part of `make test`: a full run takes a while.

    python scripts/mutate.py                  # every mutation (`make mutate`)
    python scripts/mutate.py --list           # what would run
    python scripts/mutate.py io graph- -j 2   # ids or paths containing "io" or "graph-", two at a time
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from queue import Queue

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import MUTATIONS, Mutation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "runs", ".pytest_cache", "__pycache__", ".mypy_cache", "build", "dist"}


@dataclass
class Result:
    mutation: Mutation
    status: str  # killed | survived | stale | timeout | error
    seconds: float = 0.0
    detail: str = ""


def source_files(root: Path) -> list[Path]:
    """Files to copy: git's tracked and untracked-but-not-ignored files, else a walk without caches/venvs."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
        return [Path(p) for p in out.decode().split("\0") if p and (root / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p.relative_to(root) for p in root.rglob("*")
                if p.is_file() and not SKIP & set(p.relative_to(root).parts) and p.suffix != ".pyc"]


def make_copy(root: Path, files: list[Path], dest: Path) -> Path:
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)
    return dest


def stale_reason(m: Mutation, text: str) -> str:
    for old, _ in m.edits:
        n = text.count(old)
        if n != 1:
            return f"{'not found' if n == 0 else f'found {n} times'} in {m.path}: {old.strip()[:60]!r}"
    return ""


def mutated(m: Mutation, text: str) -> str:
    for old, new in m.edits:
        text = text.replace(old, new, 1)
    return text


def pytest_cmd(tests: tuple[str, ...], extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *extra, *tests]


def _default_sigint() -> None:
    """In the pytest child: Ctrl-C handled as in a terminal, even when this script runs as a background job
    (which starts with SIGINT ignored, and the interrupt tests would then see no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float, extra: list[str]) -> tuple[int | None, str]:
    """pytest's exit code (None on timeout) and the tail of its output, run inside ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        res = subprocess.run(pytest_cmd(tests, extra), cwd=tree, env=env, capture_output=True, text=True, timeout=timeout,
                             preexec_fn=_default_sigint)
    except subprocess.TimeoutExpired:
        return None, ""
    return res.returncode, (res.stdout + res.stderr)[-3000:]


def first_failure(output: str) -> str:
    """The first failing test's id, and how many more failed (with --maxfail above 1)."""
    failed = [line.split(" - ")[0].split(" ", 1)[1][:120] for line in output.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    return "" if not failed else failed[0] + (f" (+{len(failed) - 1} more)" if len(failed) > 1 else "")


def run_one(m: Mutation, tree: Path, timeout: float, extra: list[str]) -> Result:
    target = tree / m.path
    original = target.read_text()
    reason = stale_reason(m, original)
    if reason:
        return Result(m, "stale", detail=reason)
    t0 = time.perf_counter()
    target.write_text(mutated(m, original))
    try:
        code, out = run_tests(tree, m.tests, timeout, extra)
    finally:
        target.write_text(original)
    took = time.perf_counter() - t0
    if code is None:
        return Result(m, "timeout", took, f"no result after {timeout:.0f}s (counted as killed)")
    if code == 0:
        return Result(m, "survived", took, "every listed test passed")
    if code == 1:
        return Result(m, "killed", took, first_failure(out))
    if code == 5:
        return Result(m, "stale", took, "pytest collected no tests: fix the mutation's test list")
    return Result(m, "error", took, f"pytest exit {code}: {(first_failure(out) or out.strip().splitlines()[-1:] or [''])[0][:120]}")


def baseline(tree: Path, mutations: list[Mutation], timeout: float, extra: list[str]) -> None:
    """The listed tests must pass on the unmutated copy, or every 'kill' would mean nothing."""
    tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
    missing = [t for t in tests if not (tree / t.split("::")[0]).exists()]
    if missing:
        sys.exit(f"mutate: listed test files do not exist: {', '.join(missing)}; fix scripts/mutations.py")
    print(f"baseline: {len(tests)} test targets on the unmutated tree ...", flush=True)
    code, out = run_tests(tree, tests, timeout * 4, extra)
    if code != 0:
        sys.exit(f"mutate: the tests fail without any mutation (pytest exit {code}); fix them first:\n{out[-2000:]}")


def select(ids: list[str]) -> list[Mutation]:
    if not ids:
        return list(MUTATIONS)
    chosen = [m for m in MUTATIONS if any(s in m.id or s in m.path for s in ids)]
    if not chosen:
        sys.exit(f"mutate: nothing matches {ids}; see --list")
    return chosen


def table(results: list[Result]):
    from rich.table import Table

    style = {"killed": "green", "survived": "bold red", "stale": "yellow", "timeout": "cyan", "error": "magenta"}
    t = Table(title="mutation testing", title_justify="left")
    for col in ("mutation", "file", "what", "result", "s", "caught by / why"):
        t.add_column(col, overflow="fold")
    for r in results:
        t.add_row(r.mutation.id, r.mutation.path, r.mutation.what, f"[{style[r.status]}]{r.status}[/]",
                  f"{r.seconds:.0f}", r.detail)
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ids", nargs="*", help="run only mutations whose id or file contains one of these")
    ap.add_argument("--list", action="store_true", help="list the selected mutations and their tests (flagging stale ones), run nothing")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="mutations tested at once, each in its own copy (default 1)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mutation before it counts as killed by timeout")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (only when you just ran it)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--pytest-arg", action="append", default=[], help="extra pytest argument (repeatable)")
    ap.add_argument("--tests", nargs="+", help="run these tests against every selected mutation instead of its own list "
                                               "(e.g. to check that one particular test catches a bug)")
    args = ap.parse_args(argv)
    chosen = select(args.ids)
    if args.tests:
        chosen = [replace(m, tests=tuple(args.tests)) for m in chosen]
    if args.list:
        stale = 0
        for m in chosen:
            reason = stale_reason(m, (ROOT / m.path).read_text()) if (ROOT / m.path).is_file() else f"{m.path} missing"
            stale += bool(reason)
            print(f"{m.id:22} {m.path:26} {m.what}\n{'':22} tests: {' '.join(m.tests)}"
                  + (f"\n{'':22} STALE: {reason}" if reason else ""))
        print(f"{len(chosen)} mutations, {stale} stale")
        return 1 if stale else 0
    from rich.console import Console

    from stages.lib.progress import progress_bar

    console = Console(width=None if sys.stdout.isatty() else 200)
    files = source_files(ROOT)
    with tempfile.TemporaryDirectory(prefix="norm-mutate-") as tmp:
        trees: Queue[Path] = Queue()
        for i in range(max(1, args.jobs)):
            trees.put(make_copy(ROOT, files, Path(tmp) / f"tree{i}"))
        if not args.no_baseline:
            tree = trees.get()
            baseline(tree, chosen, args.timeout, args.pytest_arg)
            trees.put(tree)
        results: list[Result] = []
        with progress_bar(console=console) as progress:
            task = progress.add_task("mutations", total=len(chosen))

            def job(m: Mutation) -> Result:
                tree = trees.get()
                try:
                    return run_one(m, tree, args.timeout, args.pytest_arg)
                finally:
                    trees.put(tree)

            with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                for r in pool.map(job, chosen):
                    results.append(r)
                    progress.console.print(f"{r.mutation.id}: {r.status} ({r.seconds:.0f}s) {r.detail}", soft_wrap=True)
                    progress.advance(task)
    console.print(table(results))
    counts = {s: sum(r.status == s for r in results) for s in ("killed", "timeout", "error", "survived", "stale")}
    caught = counts["killed"] + counts["timeout"] + counts["error"]
    console.print(f"{caught}/{len(results)} killed ({counts['timeout']} by timeout, {counts['error']} by an error), "
                  f"{counts['survived']} survived, {counts['stale']} stale")
    for r in results:
        if r.status in ("survived", "stale"):
            console.print(f"  {r.status}: {r.mutation.id} ({r.mutation.path}): {r.mutation.what}")
    if args.json:
        args.json.write_text(json.dumps([{"id": r.mutation.id, "path": r.mutation.path, "what": r.mutation.what,
                                          "status": r.status, "seconds": round(r.seconds, 1), "detail": r.detail,
                                          "tests": list(r.mutation.tests)} for r in results], indent=2) + "\n")
    return 1 if counts["survived"] or counts["stale"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
