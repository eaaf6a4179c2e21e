"""Slide inference: inputs (slide, folder or manifest), predictions and attention per patch and scale."""
