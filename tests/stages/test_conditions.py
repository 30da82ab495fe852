"""stages.lib.conditions on a fake /proc + /sys tree (and once on this machine): parsing, steal, flags."""
from __future__ import annotations

from pathlib import Path

import pytest

from stages.lib import conditions


def fake_root(tmp_path: Path, *, stat: str = "cpu  100 0 50 800 10 0 0 40 0 0", mhz: tuple = (2000, 2000),
              governor: str = "performance", load: str = "0.50 0.40 0.30 1/100 999", jetson: bool = False) -> Path:
    (tmp_path / "proc").mkdir(exist_ok=True)
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nmodel name\t: Fake CPU @ 2.00GHz\n")
    (tmp_path / "proc/stat").write_text(f"{stat}\ncpu0 1 2 3\n")
    (tmp_path / "proc/loadavg").write_text(load + "\n")
    for i, f in enumerate(mhz):
        d = tmp_path / f"sys/devices/system/cpu/cpu{i}/cpufreq"
        d.mkdir(parents=True, exist_ok=True)
        (d / "scaling_governor").write_text(governor + "\n")
        (d / "scaling_cur_freq").write_text(f"{f * 1000}\n")
        (d / "scaling_min_freq").write_text("2000000\n")
        (d / "scaling_max_freq").write_text("2000000\n" if jetson else "3500000\n")
    if jetson:
        (tmp_path / "etc").mkdir(exist_ok=True)
        (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
        (tmp_path / "etc/nvpmodel.conf").write_text("< POWER_MODEL ID=0 NAME=MAXN >\n< POWER_MODEL ID=2 NAME=15W >\n")
        (tmp_path / "var/lib/nvpmodel").mkdir(parents=True)
        (tmp_path / "var/lib/nvpmodel/status").write_text("pmode:0002 fmode:quiet\n")
        gpu = tmp_path / "sys/class/devfreq/17000000.ga10b"
        gpu.mkdir(parents=True)
        (gpu / "min_freq").write_text("918000000\n")
        (gpu / "max_freq").write_text("918000000\n")
    return tmp_path


def test_probe_reads_cpu_state(tmp_path):
    p = conditions.Probe(fake_root(tmp_path, mhz=(1800, 2200)))
    assert p.cpu_model() == "Fake CPU @ 2.00GHz"
    assert p.cpufreq() == {"governor": "performance", "mhz": 2000.0, "pinned": False}
    assert p.loadavg() == [0.5, 0.4, 0.3]
    assert p.stat() == {"total": 1000, "idle": 810, "steal": 40}  # guest columns are inside user/nice already
    snap = p.snapshot()
    assert snap["gpu"] is None and snap["jetson"] is None  # CPU device, not a Jetson


def test_probe_is_silent_where_nothing_is_readable(tmp_path):
    p = conditions.Probe(tmp_path)  # an empty tree: a container without cpufreq, say
    assert p.cpu_model() is None and p.loadavg() is None and p.stat() is None
    assert p.cpufreq() == {"governor": None, "mhz": None, "pinned": None}
    mon = conditions.Monitor(probe=p)
    mon.start()
    mon.tick()
    out = mon.finish()
    assert out["changed"] == [] and "steal" not in out["during"]


def test_jetson_power_mode_and_clocks(tmp_path):
    j = conditions.Probe(fake_root(tmp_path, jetson=True)).jetson()
    assert j["nvpmodel"] == "2 (15W)" and j["jetson_clocks"].startswith("on")
    (tmp_path / "sys/class/devfreq/17000000.ga10b/min_freq").write_text("306000000\n")
    assert conditions.Probe(tmp_path).jetson()["jetson_clocks"] == "off"


def _tick(t: float, busy: int, total: int, steal: int, own: float, mhz: float | None = 2000.0) -> dict:
    return {"t": t, "stat": {"total": total, "idle": total - busy, "steal": steal}, "own_s": own, "mhz": mhz}


def test_summarize_computes_steal_and_others_load_and_flags_changes():
    snap = {"cpufreq": {"governor": "performance"}, "gpu": None, "jetson": None}
    # 2 CPUs at HZ=100: 200 ticks per second in all; we use 1 core, others 0 then 1.5 cores
    steady = [_tick(float(s), busy=100 * s, total=200 * s, steal=0, own=float(s)) for s in range(6)]
    out = conditions.summarize(snap, snap, steady, hz=100)
    assert out["changed"] == [] and out["during"]["steal"] == 0
    assert out["during"]["others_cores"]["max"] == pytest.approx(0.0)
    loaded = steady[:4] + [_tick(3.0 + s, busy=300 + 250 * s, total=600 + 200 * s, steal=20 * s, own=3.0 + s, mhz=1500.0)
                           for s in range(1, 4)]
    out = conditions.summarize(snap, {**snap, "cpufreq": {"governor": "powersave"}}, loaded, hz=100)
    assert out["during"]["others_cores"]["max"] == pytest.approx(1.5)
    assert out["during"]["steal"] == pytest.approx(60 / 1200)
    text = " | ".join(out["changed"])
    for needle in ("varied from 0.0 to 1.5 cores", "CPU steal 5%", "CPU clock varied from 1500 to 2000 MHz",
                   "governor changed from performance to powersave"):
        assert needle in text, (needle, text)


class FakeNvml:
    """The pynvml calls the probe makes, strict: unknown attributes raise, like the real module."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def __init__(self, sm: int = 1980, temp: int = 40, fail: bool = False):
        self.sm, self.temp, self.fail = sm, temp, fail

    def nvmlInit(self) -> None:
        if self.fail:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, i: int) -> object:
        return ("handle", i)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> object:
        return ("handle", uuid)

    def nvmlDeviceGetClockInfo(self, h, kind: int) -> int:
        return self.sm if kind == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetTemperature(self, h, kind: int) -> int:
        return self.temp

    def nvmlDeviceGetEnforcedPowerLimit(self, h) -> int:
        return 700_000

    def nvmlDeviceGetPowerUsage(self, h) -> int:
        return 95_500

    def nvmlDeviceGetCurrentClocksEventReasons(self, h) -> int:
        return 0


def test_gpu_state_through_nvml_and_its_changes(tmp_path):
    nv = FakeNvml()
    p = conditions.Probe(tmp_path, device="cuda:0", nvml=nv)
    g = p.gpu()
    assert g == {"sm_mhz": 1980, "mem_mhz": 2619, "temperature_c": 40, "power_limit_w": 700.0, "power_w": 95.5,
                 "throttle_reasons": 0}
    nv.sm, nv.temp = 1400, 55
    after = p.gpu()
    changed = conditions._gpu_changes(g, after)
    assert any("SM clock changed from 1980 to 1400" in c for c in changed)
    assert any("temperature rose from 40 to 55" in c for c in changed)
    broken = conditions.Probe(tmp_path, device="cuda", nvml=FakeNvml(fail=True)).gpu()
    assert broken["nvml"].startswith("not readable: RuntimeError")
    assert conditions.Probe(tmp_path, device="cpu", nvml=nv).gpu() is None


def test_monitor_on_this_machine():
    mon = conditions.Monitor()
    mon.start()
    sum(i * i for i in range(200_000))
    mon.tick()
    out = mon.finish()
    assert set(out) == {"before", "after", "during", "changed"}
    assert out["before"]["loadavg"] is not None and isinstance(out["changed"], list)
    with pytest.raises(RuntimeError):
        conditions.Monitor().finish()
