"""Errors, the fedmed logger, atomic file writes, processes that die with their parent and a quiet
Opacus import: what every layer uses.

Imports nothing from fedmed.
"""
