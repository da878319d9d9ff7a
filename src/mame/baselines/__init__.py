"""Baselines written here for side-by-side runs on the same patched block (ToMe)."""
