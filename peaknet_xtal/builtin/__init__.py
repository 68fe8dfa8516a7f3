"""Built-in sources, writers and model families, registered through the same hooks as
third-party plugins."""
