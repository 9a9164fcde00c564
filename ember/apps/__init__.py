"""Applications built on the engine: re-ranking (ICR and baselines); each runs as a plan of engine requests."""
