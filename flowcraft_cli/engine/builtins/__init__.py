"""The built-in node types, one module each; ``function`` calls a registered user function."""
