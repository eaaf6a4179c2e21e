"""Multiple-instance learning: bags drawn from phenotype clusters, CS-MIL network, batch helpers."""
