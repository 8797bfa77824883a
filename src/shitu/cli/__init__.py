"""The `shitu` command line."""
