"""What one hospital does in a run, framework-free: its session (data, model, training, evaluation,
personalization), its privacy policy and guarded ledger, the audit log of what left it, its
intensity normalization state and its site-local layers.

Imports fedmed.privacy, fedmed.tasks and everything below them; never flwr.
"""
