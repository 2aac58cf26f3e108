"""Helpers the tests share: generated inputs (no download)."""
