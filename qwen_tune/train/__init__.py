"""Training: methods, Trainer wrapper, distributed checks, the recipe runner."""
