"""rsd_toolkit: Reverse Speculative Decoding traces for small models, across tokenizers."""

__version__ = "0.1.0"
