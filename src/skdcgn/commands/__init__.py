"""CLI subcommands: thin argument parsing over the library; no logic of their own."""
