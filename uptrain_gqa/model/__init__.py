"""Model facts: family layouts as data, the one model-shape type, and what a checkpoint is."""
