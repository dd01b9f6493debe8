"""One module per group of commands: each adds its parsers (``add_parsers``) and holds their handlers."""
