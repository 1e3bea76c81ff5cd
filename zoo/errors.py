"""The one exception that means "the user's input is wrong"."""


class UsageError(ValueError):
    """Input the user gave is not valid; the message says what is. `zoo` prints it on one line and exits 2
    (any other exception exits 1). A ValueError, so code catching ValueError around a check still does."""
