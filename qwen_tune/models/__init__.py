"""Qwen model implementations and loading (Qwen-1 bundled; Qwen1.5+ via transformers)."""
