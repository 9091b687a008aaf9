"""Keel: GRPO for reasoning LLMs that does not capsize."""

__version__ = "0.1.0"
