"""Deployment: provisioning (CA, certificates, node keys), starting and supervising the SuperLink,
the SuperNodes and fedmed's executors, the Flower CLI calls a coordinator makes, and a whole
federation on one machine for tests and trials.

Imports fedmed.flower (its runtime: environment, executor, SuperNode) and everything below it.
"""
