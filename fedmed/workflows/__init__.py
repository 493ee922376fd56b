"""The use cases: simulate a federation on one machine (the built-in demo too), launch and follow a deployed
run, train the local-only and pooled baselines, read a run back, apply a trained model to new scans and export it.

The `fedmed` command (fedmed.cli) and the Python API (fedmed.api) both call these. Imports fedmed.deploy,
fedmed.flower and everything below them.
"""
