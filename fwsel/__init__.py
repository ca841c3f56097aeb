"""fwsel: online fine-tuning of LLMs with optimizer-aware data selection."""

__version__ = "0.1.0"
