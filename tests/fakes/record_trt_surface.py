#!/usr/bin/env python3
"""Record the public surface of real TensorRT Python bindings into tests/fakes/trt_surface.json.

The strict fake (tests/fakes/fake_tensorrt.py) is checked against this record, so it cannot offer a name,
an enum member or a method the real bindings lack. No GPU is needed: the bindings wheels (about 1 MB each)
come from the package index, and their extension module is imported with stand-in core libraries (stub
``libnvinfer.so.N`` etc. that define every symbol the extension imports; nothing in them is ever called).

    python -m pip download --no-deps --only-binary=:all: -d /tmp/trt-wheels \\
        tensorrt-cu12-bindings==10.3.0 tensorrt-cu12-bindings==10.16.1.11 tensorrt-cu13-bindings==11.4.0.106
    python tests/fakes/record_trt_surface.py /tmp/trt-wheels/*.whl

(x86_64 Linux, a C compiler, and the wheels' Python version, e.g. ``--python-version 3.11`` for pip download
if it differs from the one running this.) Each wheel is recorded under its TensorRT version; the existing
entries for other versions are kept.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

RECORD = Path(__file__).with_name("trt_surface.json")
# The classes and enums the project (and the fake) touch; the record holds their whole public surface.
CLASSES = ["Builder", "IBuilderConfig", "INetworkDefinition", "IOptimizationProfile", "OnnxParser", "IParserError",
           "Runtime", "ICudaEngine", "IExecutionContext", "IHostMemory", "ITimingCache", "Dims", "Logger", "ILogger"]
ENUMS = ["BuilderFlag", "MemoryPoolType", "HardwareCompatibilityLevel", "TensorIOMode", "DataType",
         "NetworkDefinitionCreationFlag"]
SYSTEM_LIBS = ("libc.so", "libm.so", "libdl.so", "libpthread.so", "librt.so", "libstdc++.so", "libgcc_s.so", "ld-linux",
               "libpython")

INTROSPECT = r"""
import json, sys, inspect
import importlib
mod = importlib.import_module(sys.argv[1])
CLASSES, ENUMS = json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {"version": getattr(mod, "__version__", None), "module": sorted(n for n in dir(mod) if not n.startswith("_")),
       "classes": {}, "enums": {}, "signatures": {}}
for name in CLASSES:
    cls = getattr(mod, name, None)
    if cls is None:
        continue
    out["classes"][name] = sorted(n for n in dir(cls) if not n.startswith("_") or n in
                                  ("__len__", "__getitem__", "__iter__", "__eq__", "__init__"))
    for attr in out["classes"][name]:
        obj = inspect.getattr_static(cls, attr, None)
        doc = getattr(obj, "__doc__", None) or ""
        if isinstance(obj, property):
            doc = (obj.fget.__doc__ or "") if obj.fget else ""
        sigs = [ln.strip() for ln in doc.splitlines() if ln.strip().startswith((attr + "(", "(self", "1. " + attr, "2. " + attr))]
        if sigs:
            out["signatures"][name + "." + attr] = sigs
for name in ENUMS:
    e = getattr(mod, name, None)
    if e is not None:
        out["enums"][name] = sorted(getattr(e, "__members__", {}))
print(json.dumps(out))
"""


def _undefined_symbols(so: Path) -> list[str]:
    out = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True, text=True, check=True).stdout
    syms = []
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == "U" or (len(parts) >= 2 and parts[-2] in ("U", "w")):
            sym = parts[-1].split("@")[0]
            if line.split()[0] != "w":
                syms.append(sym)
    return sorted(set(syms))


def _needed(so: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\).*\[(.+?)\]", out)


def _defined_by_system(symbols: list[str], libs: list[str]) -> set[str]:
    """Symbols already provided by the system libraries the extension links (libstdc++, libc, ...): the stubs
    load before them, so defining one of these there would shadow the real one."""
    have: set[str] = set()
    for lib in libs:
        path = subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True, timeout=60).stdout.strip()
        if path and Path(path).is_file():
            out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, timeout=60).stdout
            have |= {ln.split()[-1].split("@")[0] for ln in out.splitlines() if ln.split()}
    return have & set(symbols)


def stand_ins(so: Path, dest: Path) -> None:
    """Stub shared libraries for every non-system NEEDED library, defining what the extension imports."""
    needed = _needed(so)
    system = [n for n in needed if n.startswith(SYSTEM_LIBS)]
    missing = [n for n in needed if not n.startswith(SYSTEM_LIBS)]
    undefined = _undefined_symbols(so)
    provided = _defined_by_system(undefined, system)
    symbols = [s for s in undefined if s not in provided]
    symbols = [s for s in symbols if not s.startswith(("Py", "_Py", "__cxa", "_Unwind", "__gxx"))]
    src = dest / "stubs.c"
    src.write_text("".join(f"void {s}(void) {{}}\n" for s in symbols if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", s)))
    for lib in missing:
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(dest / lib), f"-Wl,-soname,{lib}", str(src)], check=True)


def record_wheel(wheel: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="trt-surface-") as tmp:
        root = Path(tmp)
        zipfile.ZipFile(wheel).extractall(root / "site")
        sos = sorted((root / "site").rglob("tensorrt*.so"))
        if not sos:
            raise SystemExit(f"{wheel.name}: no tensorrt extension module inside")
        so = sos[0]
        (root / "stubs").mkdir()
        stand_ins(so, root / "stubs")
        package = so.parent.relative_to(root / "site").as_posix().replace("/", ".")
        # the package (its __init__ adds nptype, Logger.WARNING, ...), or the bare extension if there is none
        module = package if (so.parent / "__init__.py").exists() else so.name.split(".")[0]
        env = {**os.environ, "LD_LIBRARY_PATH": str(root / "stubs"), "PYTHONPATH": str(root / "site")}
        res = subprocess.run([sys.executable, "-c", INTROSPECT, module, json.dumps(CLASSES), json.dumps(ENUMS)],
                             capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
        if res.returncode != 0:
            raise SystemExit(f"{wheel.name}: importing {module} with stand-in libraries failed:\n{res.stderr[-2000:]}")
        data = json.loads(res.stdout)
    m = re.search(r"bindings-([\d.]+?)-", wheel.name)
    data["version"] = data.get("version") or (m.group(1) if m else None)
    data["wheel"] = wheel.name
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheels", nargs="+", type=Path, help="tensorrt-cu1x-bindings wheels")
    ap.add_argument("--out", type=Path, default=RECORD)
    args = ap.parse_args(argv)
    record = json.loads(args.out.read_text()) if args.out.is_file() else {}
    record.setdefault("_about", "public names of the real TensorRT Python bindings per version; made by "
                                "tests/fakes/record_trt_surface.py, checked against tests/fakes/fake_tensorrt.py")
    for wheel in args.wheels:
        data = record_wheel(wheel)
        key = ".".join(data["version"].split(".")[:2])
        record[key] = data
        print(f"{wheel.name}: TensorRT {data['version']}, {len(data['module'])} module names, "
              f"{sum(map(len, data['classes'].values()))} class members")
    args.out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
