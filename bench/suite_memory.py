"""The test process's memory, read after every test: a pytest plugin.

The suite runs in one process that starts hundreds of apps, so memory an app keeps after it stops
adds up across the run. This plugin reads the process's resident memory (VmRSS) and its peak so far
(VmHWM) from /proc after each test, and prints at the end the peak and the tests after which the
resident memory grew most. ``SUITE_MEMORY_OUT`` names a file for every reading (tab-separated: MB
resident, MB peak, test id). With ``SUITE_MEMORY_TRIM=1`` glibc's ``malloc_trim(0)`` returns the
heap's free pages to the system after each test, before the reading: what is left is what the
process holds, not what the allocator keeps for later.

    PYTHONPATH=bench python -m pytest -p suite_memory
    SUITE_MEMORY_OUT=runs/suite_memory.tsv PYTHONPATH=bench python -m pytest -p suite_memory tests/service
    SUITE_MEMORY_TRIM=1 PYTHONPATH=bench python -m pytest -p suite_memory tests/service
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

LARGEST = 10


def memory_mb() -> tuple[int, int]:
    """(resident, peak resident) of this process in MB, from /proc/self/status."""
    values: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) // 1024  # kB
    return values["VmRSS"], values["VmHWM"]


class SuiteMemory:
    def __init__(self, out: Path | None, trim: bool) -> None:
        self.readings: list[tuple[int, int, str]] = []
        self.out = out.open("w") if out is not None else None
        self.trim = ctypes.CDLL("libc.so.6").malloc_trim if trim else None

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        if self.trim is not None:
            self.trim(0)
        resident, peak = memory_mb()
        self.readings.append((resident, peak, nodeid))
        if self.out is not None:
            self.out.write(f"{resident}\t{peak}\t{nodeid}\n")
            self.out.flush()

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.readings:
            return
        growth = [
            (after[0] - before[0], after[2])
            for before, after in zip(self.readings, self.readings[1:], strict=False)
        ]
        write = terminalreporter.write_line
        terminalreporter.section("memory of the test process")
        first, last = self.readings[0], self.readings[-1]
        write(
            f"peak resident {last[1]:,} MB; resident after the first test {first[0]:,} MB, "
            f"after the last {last[0]:,} MB ({len(self.readings)} tests)"
        )
        write("largest growth after one test (MB, test):")
        for grew, nodeid in sorted(growth, reverse=True)[:LARGEST]:
            write(f"  {grew:+6,}  {nodeid}")

    def pytest_unconfigure(self) -> None:
        if self.out is not None:
            self.out.close()


def pytest_configure(config: pytest.Config) -> None:
    out = os.environ.get("SUITE_MEMORY_OUT")
    trim = os.environ.get("SUITE_MEMORY_TRIM") == "1"
    config.pluginmanager.register(SuiteMemory(Path(out) if out else None, trim), "suite_memory_readings")
