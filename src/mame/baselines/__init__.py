"""Baselines written here for side-by-side runs on the same patched block: ToMe, EViT and PiToMe for ViTs; KV-cache
baselines for causal language models."""
