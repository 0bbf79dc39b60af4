"""Built-in models (their weights ship in the package) and the readers of offline data."""
