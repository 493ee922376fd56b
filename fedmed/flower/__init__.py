"""The only layer that imports flwr: ServerApp, ClientApp, record conversion and the engines."""

import os

# Sites never phone home. Set before flwr is imported anywhere in fedmed, and not overridable:
# a hospital site must not start sending telemetry because of a stray environment variable.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
