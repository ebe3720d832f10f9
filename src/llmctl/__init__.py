"""llmctl: build a language model from scratch, one stage at a time."""

__version__ = "0.1.0"
