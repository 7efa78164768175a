"""One module per subcommand: they do the work and return results or yield events.

Engines never print, never import typer and never read sys.argv.
"""

__all__: list[str] = []
