"""CLI sub-commands; each module has `register(app)` that adds its command to the Typer app."""
