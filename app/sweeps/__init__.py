"""Sweeps: one model, base steps and the values to vary; one child job per point of the grid,
and a report of every point's metrics with the Pareto frontier (size vs latency vs quality)."""
