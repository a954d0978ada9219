"""Built-in judges of sample quality."""
