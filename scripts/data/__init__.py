"""Cohort description (manifests) and the deterministic demo cohort."""
