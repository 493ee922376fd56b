"""The coordinator's side: the ServerApp, its round loop, the strategies it builds, and the exchanges
with the sites (intensity normalization, SecAgg+ rounds, cross-site evaluation).

Imports fedmed.flower.wire and records and the layers below fedmed.flower; never the client side.
"""
