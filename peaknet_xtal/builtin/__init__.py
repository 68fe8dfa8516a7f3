"""Built-in sources and writers, registered through the same hooks as third-party plugins."""
