"""Evaluation protocol of the CS-MIL paper: metrics, statistics, figures and the report."""
