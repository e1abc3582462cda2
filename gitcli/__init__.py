"""gitcap: train, run and score CLIP-prefix image-to-text models."""

__version__ = "0.1.0"
