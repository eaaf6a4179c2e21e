"""Patch encoders, the per-slide feature store, extraction and phenotype clustering."""
