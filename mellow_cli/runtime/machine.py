"""Which CPU this is, as a short key: what a measurement or a build made here is kept under, so
that a cache copied to another machine (or a CPU swapped under a virtual machine) is measured or
built again instead of trusted.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path


def cpu_key() -> str:
    """16 hex digits of the CPU's architecture, model name and feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                flags += line.split(":", 1)[1].strip() + ";"
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return hashlib.sha256((platform.machine() + platform.processor() + flags).encode()).hexdigest()[:16]
