"""A run: its plan, the executors that start one worker per cell (here or on a Ray cluster),
the append-only results store, the time estimate. Imports cell and below."""
