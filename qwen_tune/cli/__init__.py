"""Command-line entry points (`qwen-tune ...`)."""
