"""Wall time and peak resident memory of one child process.

`os.wait4`'s ru_maxrss is not the child's own peak: on Linux a fork copies the parent's
RSS high-water mark and exec keeps it, so a child of a large driver reports at least the
driver's peak. The child's own peak is VmHWM in /proc/PID/status (a high-water mark kept
per address space, reset by exec); it is read every `interval` seconds while the child
runs, so growth in its last `interval` before exit is the only part that can be missed.
"""

from __future__ import annotations

import os
import subprocess
import time


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def run_timed(cmd: list[str], stdout, stderr, interval: float = 0.05) -> tuple[int, float, float]:
    """Run cmd to completion; return (exit code, wall seconds, peak RSS MiB of that process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr)
    peak = 0
    while True:
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, _vm_hwm_kib(proc.pid) or 0)
        time.sleep(interval)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, peak / 1024
