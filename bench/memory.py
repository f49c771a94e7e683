"""A process's peak resident memory, as Linux keeps it for the process itself (``VmHWM``).

Not ``ru_maxrss``: a process starts with its parent's (fork copies the parent's resident
size, exec keeps it), so a child of a bench process holding models would read the parent's
memory as its own peak.
"""

from __future__ import annotations

from pathlib import Path


def peak_resident_bytes() -> int:
    """The most memory this process has had resident, since it started or since
    :func:`reset_peak`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM line")


def reset_peak() -> None:
    """Start the peak again from what is resident now."""
    Path("/proc/self/clear_refs").write_text("5")
