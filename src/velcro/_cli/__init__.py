"""velcro subcommands, one module each (see velcro.cli)."""
