"""sensgen: sensitivity and generalization in neural networks (Novak et al., ICLR 2018)."""

__version__ = "0.1.0"
