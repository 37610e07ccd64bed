"""cmkit: consistency models in PyTorch (Song et al. 2023; Song & Dhariwal 2023)."""

__version__ = "0.1.0"
