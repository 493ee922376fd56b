"""Flower's processes as fedmed runs them: the environment, the task executor (app approval, warm
ClientApp starts), the SuperNode with short polls, and the Flower App (FAB) a run carries.

Imports fedmed.config and fedmed.core; the executor preloads the ClientApp by name.
"""
