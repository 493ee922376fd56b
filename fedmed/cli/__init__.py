"""The fedmed command line (typer): parse, call, print."""
