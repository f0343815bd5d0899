"""Built-in protocol drivers, one package or module per protocol."""
