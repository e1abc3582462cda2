"""Helpers shared by test modules (import as `support.NAME`: tests/ is on sys.path)."""
