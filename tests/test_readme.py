"""The README's "measure your own model" lines run as written on a user's own module, and
its example study file is a valid study."""

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block_after(heading: str, language: str = "python") -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


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


def test_the_image_model_recipe_measures_transitions_of_a_conv_net():
    # README: paths are flat; an image model is measured behind an Unflatten.
    import sensgen

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5))
    x = torch.randn(3, 1, 8, 8)
    path = sensgen.metrics.ellipse(*x[:3].flatten(1), n_points=400)
    flat = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), model)
    t = sensgen.metrics.transitions(flat, path)
    assert isinstance(t, int) and t > 0
    assert torch.equal(flat(path[:2]), model(path[:2].view(2, 1, 8, 8)))


def test_the_example_study_file_loads_and_its_conditional_axis_works(tmp_path):
    from sensgen import study

    text = _python_block_after("### Study files", "toml")
    path = tmp_path / "example.toml"
    path.write_text(text, encoding="utf-8")
    specs = study.load(path).specs()
    # 50 draws x 3 depths x 2 grid seeds x 2 pair members, all distinct.
    assert len(specs) == 50 * 3 * 2 * 2 == len({s.run_id for s in specs})
    assert {s.seed for s in specs} == {0, 1}
    # The commented conditional axis, switched on as its comment says.
    lines = text.splitlines()
    (conditional,) = [line for line in lines if line.startswith("# lr = {by")]
    sampled = [line for line in lines if line.startswith("lr = {log_uniform")]
    assert len(sampled) == 1
    edited = text.replace(sampled[0] + "\n", "").replace(
        conditional, conditional[2:] + '\noptimizer = ["sgd", "adam"]'
    )
    path.write_text(edited, encoding="utf-8")
    lrs = {}
    for spec in study.load(path).specs():
        lrs.setdefault(spec.optimizer, set()).add(spec.lr)
    assert set(lrs) == {"sgd", "adam"}
    assert all(1e-3 <= lr <= 1e-1 for lr in lrs["sgd"]) and len(lrs["sgd"]) > 5
    assert all(1e-4 <= lr <= 3e-3 for lr in lrs["adam"]) and len(lrs["adam"]) > 5
