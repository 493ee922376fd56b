"""Drift benchmark: strategies under strong scanner drift (run_drift.py); a package for import-linter only."""
