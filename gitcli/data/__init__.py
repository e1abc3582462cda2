"""Datasets, image transforms and collation. Knows no model: tokenizers are handed in."""
