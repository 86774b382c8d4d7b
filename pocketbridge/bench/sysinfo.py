"""Machine description and /proc readings (RSS, CPU time) for the benchmark report. Linux only; N/A elsewhere."""

from __future__ import annotations

import os
import platform
import resource
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    cpu_model = None
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.lower().startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kb = None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
            break
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {
        "cpu_model": cpu_model or platform.processor() or None,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "ram_mib": round(mem_kb / 1024) if mem_kb else None,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "os": platform.system(),
    }


def rss_kb(pid: int) -> int | None:
    """Resident set size of ``pid`` in kB (VmRSS from /proc/<pid>/status), or None."""
    text = _read(f"/proc/{pid}/status")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` (all its threads) in seconds, from /proc/<pid>/stat."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = text[text.rfind(")") + 2 :].split()
    try:
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    except (IndexError, ValueError):
        return None
    return (utime + stime) / _CLK_TCK


def machine_jiffies() -> tuple[int, int, int, int] | None:
    """(all, idle + iowait, softirq, steal) jiffies summed over every CPU, from the first line of /proc/stat."""
    return parse_proc_stat(_read("/proc/stat"))


def parse_proc_stat(text: str | None) -> tuple[int, int, int, int] | None:
    if not text:
        return None
    values = [int(v) for v in text.splitlines()[0].split()[1:]] + [0] * 10
    guest = values[8] + values[9]  # guest time is already counted in user/nice
    return sum(values) - guest, values[3] + values[4], values[6], values[7]


def busy_cores(
    before: tuple[int, int, int, int] | None, after: tuple[int, int, int, int] | None
) -> dict[str, float] | None:
    """Cores' worth of CPU the whole machine used between two machine_jiffies() readings, and of it softirq and
    steal: time this virtual machine was ready to run but its host ran something else (a noisy host slows every
    figure of a run without any process here using more CPU)."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    total, idle, softirq, steal = (a - b for a, b in zip(after, before, strict=True))
    cores = os.cpu_count() or 1
    return {
        "busy": round((total - idle) / total * cores, 2),
        "softirq": round(softirq / total * cores, 2),
        "steal": round(steal / total * cores, 2),
    }


def cpu_by_command(names: tuple[str, ...]) -> dict[str, float] | None:
    """CPU seconds (user + system) of all live processes whose command name is in ``names`` (e.g. the PostgreSQL
    server and its backends, redis-server), summed per name. Processes that exited in between are not counted."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    out = dict.fromkeys(names, 0.0)
    for entry in entries:
        if not entry.isdigit():
            continue
        text = _read(f"/proc/{entry}/stat")
        if not text:
            continue
        comm = text[text.find("(") + 1 : text.rfind(")")]
        if comm not in out:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        try:
            out[comm] += (int(fields[11]) + int(fields[12])) / _CLK_TCK
        except (IndexError, ValueError):
            continue
    return out


def main_thread_cpu_seconds(pid: int) -> float | None:
    """CPU time of ``pid``'s main thread alone (the trio event loop of the daemon)."""
    text = _read(f"/proc/{pid}/task/{pid}/stat")
    if text is None:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (IndexError, ValueError):
        return None


def own_cpu() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": ru.ru_utime, "sys": ru.ru_stime}


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (inherited by child processes); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard
