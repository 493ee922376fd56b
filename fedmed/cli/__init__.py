"""The `fedmed` command: typer commands that parse, call one function below, and print.

May import every other layer.
"""
