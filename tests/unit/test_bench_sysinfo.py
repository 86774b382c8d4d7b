"""The benchmark's reading of the machine: where the cores' time went, steal (a noisy host) apart."""

from __future__ import annotations

import os

from pocketbridge.bench.report import load_text
from pocketbridge.bench.sysinfo import busy_cores, parse_proc_stat

#                 user nice system idle iowait irq softirq steal guest guest_nice
BEFORE = "cpu  1000 0 200 5000 100 0 50 10 40 0\ncpu0 1 2 3\n"
AFTER = "cpu  1600 0 300 5400 100 0 90 210 60 0\ncpu0 1 2 3\n"


def test_proc_stat_gives_all_idle_softirq_and_steal_without_guest_twice() -> None:
    # guest time is part of user time already: it is not added to the total again
    assert parse_proc_stat(BEFORE) == (1000 + 200 + 5000 + 100 + 50 + 10, 5100, 50, 10)
    assert parse_proc_stat("") is None
    assert parse_proc_stat(None) is None


def test_steal_is_counted_apart_from_the_processes() -> None:
    load = busy_cores(parse_proc_stat(BEFORE), parse_proc_stat(AFTER))
    assert load is not None
    cores = os.cpu_count() or 1
    total = 600 + 100 + 400 + 40 + 200  # jiffies between the readings
    assert load["busy"] == round((total - 400) / total * cores, 2)
    assert load["steal"] == round(200 / total * cores, 2)
    assert load["softirq"] == round(40 / total * cores, 2)
    assert busy_cores(parse_proc_stat(AFTER), parse_proc_stat(BEFORE)) is None  # counters went backwards


def test_the_report_line_names_steal() -> None:
    line = load_text({"machine_busy_cores": 1.5, "bench_processes_cores": 1.0, "softirq_cores": 0.05,
                      "steal_cores": 0.3, "other_cores": 0.15})
    assert line == ("machine: 1.50 cores busy = daemon+workers 1.00 + softirq 0.05 + steal 0.30"
                    " + other processes 0.15")
