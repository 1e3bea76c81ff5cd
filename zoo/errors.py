"""The one exception that means "the user's input is wrong"."""


class UsageError(ValueError):
    """Input the user gave is not valid; `zoo` prints the message on one line and exits 2 (a ValueError still)."""
