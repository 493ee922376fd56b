"""The only layer that imports flwr (besides fedmed.secagg.primitives): the message protocol
(`wire`, `records`), the ServerApp (`server/`), the ClientApp (`client/`), the engines that run
them on one machine (`engines/`) and Flower's processes (`runtime/`).

Imports fedmed.site and everything below it.
"""
