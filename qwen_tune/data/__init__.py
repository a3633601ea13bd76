"""ChatML data pipeline: formats, template and masking, datasets, collators."""
