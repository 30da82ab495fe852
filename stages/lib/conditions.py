"""The conditions a timing ran under, and whether they changed during it (pure file reads; NVML optional).

Recorded per benchmark cell: CPU model, scaling governor and clock (when the kernel exposes cpufreq), load
average and CPU steal from /proc, the CPU time other processes used while we timed; on CUDA the GPU's clocks,
temperature, power limit and throttle reasons through NVML (the ``nvidia-ml-py`` package, when installed); on a
Jetson the nvpmodel power mode and whether the clocks are pinned (jetson_clocks). Everything is "when readable":
a missing file gives ``None``, never an error. The paired per-round estimator tolerates these changes; the flags
tell the reader the machine was not steady, which is worth knowing next to any figure.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

LOAD_CHANGE_CORES = 0.5  # other processes' CPU use varying by this much (in cores) during a timing is flagged
CLOCK_CHANGE = 0.10  # a CPU/GPU clock moving by 10% is flagged
STEAL_FLAG = 0.02  # a hypervisor taking 2% of the CPU time is flagged
TEMP_RISE_C = 10


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


class Probe:
    """Reads the machine's state under ``root`` (``/`` normally; a fake tree in tests)."""

    def __init__(self, root: Path | str = "/", device: str = "cpu", nvml: Any = None):
        self.root = Path(root)
        self.device = device
        self.cpus = sorted(os.sched_getaffinity(0)) if self.root == Path("/") and hasattr(os, "sched_getaffinity") else None
        self._nvml = nvml  # a pynvml-like module (tests pass a fake); None: import it when on CUDA
        self._gpu = None

    # --------------------------------------------------------------- CPU
    def cpu_model(self) -> Optional[str]:
        text = _read(self.root / "proc/cpuinfo") or ""
        names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith(("model name", "Model"))]
        return names[0] if names else None

    def _cpufreq_dirs(self) -> list[Path]:
        base = self.root / "sys/devices/system/cpu"
        if self.cpus is not None:
            dirs = [base / f"cpu{i}" / "cpufreq" for i in self.cpus]
        else:
            dirs = sorted(base.glob("cpu[0-9]*/cpufreq"))
        return [d for d in dirs if d.is_dir()]

    def cpufreq(self) -> dict:
        """Governors in use, mean current clock (MHz) and whether every CPU is pinned (min = max)."""
        govs, cur, pinned = set(), [], []
        for d in self._cpufreq_dirs():
            g = _read(d / "scaling_governor")
            if g:
                govs.add(g)
            f = _read(d / "scaling_cur_freq")
            if f and f.isdigit():
                cur.append(int(f) / 1000)
            lo, hi = _read(d / "scaling_min_freq"), _read(d / "scaling_max_freq")
            if lo and hi:
                pinned.append(lo == hi)
        return {"governor": ",".join(sorted(govs)) or None, "mhz": sum(cur) / len(cur) if cur else None,
                "pinned": all(pinned) if pinned else None}

    def mhz(self) -> Optional[float]:
        return self.cpufreq()["mhz"]

    def loadavg(self) -> Optional[list[float]]:
        text = _read(self.root / "proc/loadavg")
        try:
            return [float(v) for v in text.split()[:3]] if text else None
        except ValueError:
            return None

    def stat(self) -> Optional[dict]:
        """The aggregate ``cpu`` line of /proc/stat in clock ticks: total, idle (+iowait), steal."""
        text = _read(self.root / "proc/stat") or ""
        for ln in text.splitlines():
            if ln.startswith("cpu "):
                v = [int(x) for x in ln.split()[1:]]
                v += [0] * (8 - len(v))
                total = sum(v[:8])  # guest time is already counted in user/nice
                return {"total": total, "idle": v[3] + v[4], "steal": v[7]}
        return None

    # --------------------------------------------------------------- GPU / Jetson
    def gpu(self) -> Optional[dict]:
        """SM/memory clocks (MHz), temperature (C), power limit and draw (W), throttle reasons via NVML."""
        if not self.device.startswith("cuda"):
            return None
        nv = self._nvml
        if nv is None:
            try:
                import pynvml as nv  # the nvidia-ml-py package
            except ImportError:
                return {"nvml": "not installed (pip install nvidia-ml-py to record GPU clocks)"}
            self._nvml = nv
        try:
            if self._gpu is None:
                nv.nvmlInit()
                self._gpu = _nvml_handle(nv, int(self.device.split(":", 1)[1]) if ":" in self.device else 0)
            h = self._gpu
            out: dict[str, Any] = {"sm_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                                   "mem_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
                                   "temperature_c": nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)}
        except Exception as e:  # noqa: BLE001 - NVML errors come as NVMLError subclasses; any is "not readable"
            return {"nvml": f"not readable: {type(e).__name__}: {e}"[:200]}
        for key, fn in (("power_limit_w", "nvmlDeviceGetEnforcedPowerLimit"), ("power_w", "nvmlDeviceGetPowerUsage")):
            try:
                out[key] = getattr(nv, fn)(h) / 1000
            except Exception:  # noqa: BLE001 - not supported on every GPU
                out[key] = None
        for fn in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            if hasattr(nv, fn):
                try:
                    out["throttle_reasons"] = int(getattr(nv, fn)(h))
                except Exception:  # noqa: BLE001
                    out["throttle_reasons"] = None
                break
        return out

    def jetson(self) -> Optional[dict]:
        """nvpmodel power mode and jetson_clocks (inferred: every CPU and the GPU pinned at min = max clock)."""
        release = _read(self.root / "etc/nv_tegra_release")
        if release is None:
            return None
        out: dict[str, Any] = {"l4t": release.splitlines()[0][:120], "nvpmodel": None}
        status = _read(self.root / "var/lib/nvpmodel/status")  # "pmode:0002 fmode:..."
        m = re.search(r"pmode:(\d+)", status or "")
        if m:
            mode = int(m.group(1))
            names = dict(re.findall(r"POWER_MODEL\s+ID=(\d+)\s+NAME=(\S+?)\s*>", _read(self.root / "etc/nvpmodel.conf") or ""))
            out["nvpmodel"] = f"{mode} ({names[str(mode)]})" if str(mode) in names else str(mode)
        elif self.root == Path("/"):
            out["nvpmodel"] = _run(["nvpmodel", "-q"])
        gpu_pinned = []
        for d in self.root.glob("sys/class/devfreq/*"):
            if re.search(r"gpu|gv11b|ga10b|gp10b|gb10b", d.name):
                lo, hi = _read(d / "min_freq"), _read(d / "max_freq")
                if lo and hi:
                    gpu_pinned.append(lo == hi)
        cpu_pinned = self.cpufreq()["pinned"]
        known = [p for p in [cpu_pinned, *gpu_pinned] if p is not None]
        out["jetson_clocks"] = ("on (clocks pinned at min = max)" if known and all(known) else
                                "off" if known else None)
        return out

    # --------------------------------------------------------------- snapshots
    def snapshot(self) -> dict:
        return {"time": time.time(), "cpu": self.cpu_model(), "cpufreq": self.cpufreq(), "loadavg": self.loadavg(),
                "gpu": self.gpu(), "jetson": self.jetson()}

    def tick(self) -> dict:
        """The cheap per-round sample: /proc/stat, this process's CPU time, the mean CPU clock."""
        return {"t": time.perf_counter(), "stat": self.stat(), "own_s": time.process_time(), "mhz": self.mhz()}


def _nvml_handle(nv: Any, index: int) -> Any:
    """NVML's handle of CUDA device ``index``: by UUID, since CUDA_VISIBLE_DEVICES renumbers CUDA's devices."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:  # noqa: BLE001 - older torch without .uuid, or NVML refusing: fall back to the index
        return nv.nvmlDeviceGetHandleByIndex(index)


def _run(cmd: list[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0][:120] if out.returncode == 0 and out.stdout.strip() else None


def _others_cores(a: dict, b: dict, hz: float) -> Optional[float]:
    """Cores other processes kept busy between two ticks (busy ticks minus our own CPU time)."""
    if not a["stat"] or not b["stat"] or b["t"] <= a["t"]:
        return None
    busy = (b["stat"]["total"] - b["stat"]["idle"]) - (a["stat"]["total"] - a["stat"]["idle"])
    return max(0.0, (busy / hz - (b["own_s"] - a["own_s"])) / (b["t"] - a["t"]))


def summarize(before: dict, after: dict, ticks: list[dict], hz: Optional[float] = None) -> dict:
    """Before/after snapshots, what happened in between, and ``changed``: one line per thing that moved."""
    if hz is None:
        hz = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
    during: dict[str, Any] = {"seconds": ticks[-1]["t"] - ticks[0]["t"] if len(ticks) > 1 else 0.0}
    first, last = (ticks[0], ticks[-1]) if ticks else (None, None)
    if first and last and first["stat"] and last["stat"]:
        dt = last["stat"]["total"] - first["stat"]["total"]
        during["steal"] = (last["stat"]["steal"] - first["stat"]["steal"]) / dt if dt > 0 else None
    # others' load over windows of ~1 s (single rounds can be a few jiffies long)
    windows, start = [], 0
    for i in range(1, len(ticks)):
        if ticks[i]["t"] - ticks[start]["t"] >= 1.0 or i == len(ticks) - 1:
            o = _others_cores(ticks[start], ticks[i], hz)
            if o is not None:
                windows.append(o)
            start = i
    if windows:
        during["others_cores"] = {"min": min(windows), "max": max(windows), "mean": sum(windows) / len(windows)}
    mhz = [t["mhz"] for t in ticks if t.get("mhz")]
    if mhz:
        during["cpu_mhz"] = {"min": min(mhz), "max": max(mhz)}
    changed = []
    oc = during.get("others_cores")
    if oc and oc["max"] - oc["min"] >= LOAD_CHANGE_CORES:
        changed.append(f"other processes' CPU use varied from {oc['min']:.1f} to {oc['max']:.1f} cores")
    if during.get("steal") is not None and during["steal"] >= STEAL_FLAG:
        changed.append(f"CPU steal {during['steal']:.0%} (the hypervisor took CPU time)")
    if mhz and max(mhz) > min(mhz) * (1 + CLOCK_CHANGE):
        changed.append(f"CPU clock varied from {min(mhz):.0f} to {max(mhz):.0f} MHz")
    gb, ga = before.get("cpufreq") or {}, after.get("cpufreq") or {}
    if gb.get("governor") != ga.get("governor"):
        changed.append(f"CPU governor changed from {gb.get('governor')} to {ga.get('governor')}")
    changed += _gpu_changes(before.get("gpu") or {}, after.get("gpu") or {})
    jb, ja = before.get("jetson") or {}, after.get("jetson") or {}
    for key in ("nvpmodel", "jetson_clocks"):
        if jb.get(key) != ja.get(key):
            changed.append(f"Jetson {key} changed from {jb.get(key)} to {ja.get(key)}")
    return {"before": before, "after": after, "during": during, "changed": changed}


def _gpu_changes(b: dict, a: dict) -> list[str]:
    out = []
    if b.get("sm_mhz") and a.get("sm_mhz") and abs(a["sm_mhz"] - b["sm_mhz"]) > CLOCK_CHANGE * b["sm_mhz"]:
        out.append(f"GPU SM clock changed from {b['sm_mhz']} to {a['sm_mhz']} MHz")
    if b.get("temperature_c") is not None and a.get("temperature_c") is not None \
            and a["temperature_c"] - b["temperature_c"] >= TEMP_RISE_C:
        out.append(f"GPU temperature rose from {b['temperature_c']} to {a['temperature_c']} C")
    if b.get("power_limit_w") != a.get("power_limit_w"):
        out.append(f"GPU power limit changed from {b.get('power_limit_w')} to {a.get('power_limit_w')} W")
    idle_or_none = (None, 0, 1)  # NVML: 0 = none, 1 = GPU idle
    if a.get("throttle_reasons") not in idle_or_none and a.get("throttle_reasons") != b.get("throttle_reasons"):
        out.append(f"GPU clocks throttled (NVML reasons 0x{a['throttle_reasons']:x})")
    return out


class Monitor:
    """``start()`` before a timing, ``tick()`` after every round, ``finish()`` -> :func:`summarize`'s dict."""

    def __init__(self, device: str = "cpu", probe: Optional[Probe] = None):
        self.probe = probe or Probe(device=device)
        self._before: Optional[dict] = None
        self._ticks: list[dict] = []

    def start(self) -> None:
        self._before = self.probe.snapshot()
        self._ticks = [self.probe.tick()]

    def tick(self, _round: int = 0) -> None:
        self._ticks.append(self.probe.tick())

    def finish(self) -> dict:
        if self._before is None:
            raise RuntimeError("Monitor.finish() before start()")
        self._ticks.append(self.probe.tick())
        return summarize(self._before, self.probe.snapshot(), self._ticks)
