"""mpdeploy: Marchenko–Pastur pruning of timm vision models, deployed to parity-checked engines."""

__version__ = "0.1.0"
