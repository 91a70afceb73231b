"""Benchmarks for gradwatch: ``python -m benchmarks`` runs the overhead suite (issue 6)."""
