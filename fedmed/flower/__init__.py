"""The only layer that imports flwr: ServerApp, ClientApp, record conversion and the engines."""

import os

# Sites never phone home. Set before flwr is imported anywhere in fedmed, and not overridable:
# a hospital site must not start sending telemetry because of a stray environment variable.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
# Ray's single-machine mode: every Ray server binds to loopback instead of all interfaces
# (the variable's name is historical; it switches off Ray's multi-machine networking on any OS).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
