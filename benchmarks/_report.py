"""What every benchmark script prints the same way: its tables and the machine's CPU."""

from __future__ import annotations

import platform
import sys


def table(title: str, rows: list[tuple[str, str]]) -> None:
    """Prints an underlined title, then one aligned ``label  value`` line per row."""
    width = max(len(label) for label, _ in rows)
    print(f"\n{title}\n{'-' * len(title)}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    sys.stdout.flush()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what `platform` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
