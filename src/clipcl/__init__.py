"""clipcl: continual learning of CLIP models."""

__version__ = "0.1.0"
