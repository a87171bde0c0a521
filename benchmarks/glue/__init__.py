"""MiniLM-L6 on GLUE: the method tables (`table`), seed noise (`seed_study`), outlier transforms (`outliers`),
reconstruction convergence (`convergence`) and cost (`recon_overhead`), mixed precision (`mixed_precision`)."""
