"""Deployment: provisioning (CA, certificates, node keys), site enrollment and revocation, the nginx
front proxy, starting and supervising the SuperLink, the proxy, the SuperNodes and fedmed's
executors, the Flower CLI calls a coordinator makes, and a whole federation on one machine for
tests and trials.

Imports fedmed.flower (its runtime: environment, executor, SuperNode) and everything below it.
"""
