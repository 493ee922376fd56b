"""The use cases: simulate a federation on one machine, launch and follow a deployed run, train the
local-only and pooled baselines, apply a trained model to new scans and export it.

Imports fedmed.deploy, fedmed.flower and everything below them.
"""
