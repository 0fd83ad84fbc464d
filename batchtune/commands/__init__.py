"""One module per command: each turns a spec into a result object (plain data), and prints nothing."""
