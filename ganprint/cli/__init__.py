"""Command-line interface: thin Typer modules that parse options, call the library, print."""
