"""Errors, the fedmed logger, atomic file writes and a quiet Opacus import: what every layer uses.

Imports nothing from fedmed.
"""
