"""The `fedmed` command: typer commands that parse, call one function below, and print.

May import every layer but fedmed.api (its sibling: the other way in). A command imports fedmed's packages
inside its function: they load pydantic, cryptography, torch, MONAI or Flower, which `fedmed --help` and the
light commands must not wait for (tests/cli/test_startup.py checks it).
"""
