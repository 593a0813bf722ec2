"""Decisions over measured rows: the budget rule and the recommendation, per-unit
sensitivity, and the budget search that plans runs of its own. Imports execute and below."""
