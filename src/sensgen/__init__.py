"""sensgen: sensitivity and generalization in neural networks (Novak et al., ICLR 2018).

The supported API:

    sensgen.metrics.jacobian_norm(model, x, *, output="softmax", chunk_size=None)
    sensgen.data.load(name, *, split, root=None)
    sensgen.study.load(path_or_preset)
    sensgen.run(study, out_dir, **exec_options)
    sensgen.open_results(out_dir)          # .runs() and .points() as DataFrames

Example:
    >>> import sensgen, torch
    >>> net = sensgen.MLP(784, 10, width=64, depth=2)
    >>> sensgen.metrics.jacobian_norm(net, torch.randn(4, 784)).shape
    torch.Size([4])
"""

from sensgen import data, metrics, study
from sensgen.errors import UserError
from sensgen.models import MLP
from sensgen.runner import StudyResult, run
from sensgen.store import open_results

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "StudyResult",
    "UserError",
    "__version__",
    "data",
    "metrics",
    "open_results",
    "run",
    "study",
]
