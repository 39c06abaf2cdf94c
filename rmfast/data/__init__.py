"""Preference data: sources, row formats, tokenization with a cache, the length policy, sampling, and a
learnable synthetic generator. ``load_data(DataConfig(...), tokenizer)`` is the usual entry point."""

from .formats import REASONS, Pair
from .loader import DataConfig, DataError, DataReport, Source, load_data, load_source
from .synthetic import generate_attribute_rows, generate_pairs
from .synthetic_groups import generate_groups
from .tokenize import LengthPolicy, shared_prefix
from .tokens import TokenizedGroups

__all__ = ["DataConfig", "DataError", "DataReport", "Source", "load_data", "load_source", "generate_pairs",
           "generate_attribute_rows", "generate_groups", "LengthPolicy", "TokenizedGroups", "shared_prefix", "Pair",
           "REASONS"]
