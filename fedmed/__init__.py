"""fedmed: federated learning for hospital sites (Flower + MONAI + Opacus).

The layers, top to bottom (each imports only those below it; CI checks this with import-linter):
cli, workflows, deploy, flower, site, privacy | secagg, tasks, data | models | runs, config, core.
"""

from fedmed.flower.runtime.environment import keep_flower_quiet

__version__ = "0.1.0"

# Sites never phone home: Flower reads these when flwr is first imported, so they are set as soon as
# fedmed is, before fedmed.flower or fedmed.secagg load Flower.
keep_flower_quiet()
