"""The site's side: the ClientApp, a thin adapter from Flower messages to the site's session
(fedmed.site), with its client-level DP clipping mod and its SecAgg+ stages.

Imports fedmed.flower.wire and records and the layers below fedmed.flower; never the server side.
"""
