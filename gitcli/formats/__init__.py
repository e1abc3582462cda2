"""Torch-free readers and writers of gitcap's file formats."""
