"""mrl-toolkit: deploy Matryoshka embedding models."""

__version__ = "0.1.0"
