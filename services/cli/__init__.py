"""The `rpo` command line: `table` (every command and its handler), `args` (what handlers share), `main`."""
