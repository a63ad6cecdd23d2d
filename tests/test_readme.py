"""The README's "measure your own model" lines run as written on a user's own module."""

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block_after(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_three_lines_measure_a_users_own_model():
    code = _python_block_after("## Measure your own model")
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) == 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    model.append(nn.Linear(32, 5))
    namespace = {"model": model, "x": torch.randn(10, 20)}
    exec(code, namespace)
    assert namespace["jbar"].dtype == torch.float64 and namespace["jbar"] > 0
    assert isinstance(namespace["t"], int) and namespace["t"] > 0
