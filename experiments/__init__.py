"""fedmed's benchmarks and experiments, scripts run as `python experiments/<script>.py`.

A package only so that import-linter can check that they use fedmed's public API (fedmed, fedmed.api) and nothing
below it (pyproject.toml, [tool.importlinter]).
"""
