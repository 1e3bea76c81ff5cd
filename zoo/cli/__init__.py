"""The `zoo` command line: the group in ``main``, shared options in ``options``, one module per command. Commands
parse and print; ``training`` and ``serving`` do the work, imported inside each command (start-up without torch)."""
