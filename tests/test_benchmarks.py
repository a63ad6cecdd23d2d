"""The training benchmark runs, and its packed and looped trainers did the same work.

Timings are printed, never asserted (issue 8: targets are read off the benchmark's
output). What is asserted: every table is printed, and after 3 steps the packed trainer's
parameters equal the plain loop's to float32 rounding, for each configuration.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sensgen import data

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(
    data.locate("fashion_mnist") is None,
    reason="Fashion-MNIST is absent (install Debian's `dataset-fashion-mnist`)",
)
def test_training_benchmark_quick_run_agrees_with_the_plain_loop():
    done = subprocess.run(
        [sys.executable, "benchmarks/train.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r"float32 matmul peak: [\d,.]+ GFLOP/s", out)
    for case in ("reference", "small", "full batch"):
        assert f"\n{case}: 32 × 784-" in out
    assert out.count("products alone, GFLOP/s") == 2  # the two minibatch packs
    assert out.count("of which model init") == 3
    agreement = [float(v) for v in re.findall(r"([\d.e+-]+) after 3 steps", out)]
    assert len(agreement) == 3
    # Minibatch packs: 1.5e-8 and 6e-8 here; full batch sums 1,000 examples per product.
    assert max(agreement[:2]) < 1e-6 and agreement[2] < 1e-4
