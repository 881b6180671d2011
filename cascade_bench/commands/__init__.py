"""The ``cascade-bench`` commands, one module per group: each declares its sub-parsers
(``add_commands``) and their handlers (``HANDLERS``); ``cli`` dispatches."""
