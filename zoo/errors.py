"""The one exception that means "the user's input is wrong"."""


class UsageError(ValueError):
    """Input the user gave (an option, a path, a URI, a run id) is not valid; the message says what is.

    Raised deliberately where input is checked: the `zoo` command prints it on one line and exits 2.
    Any other exception, a ValueError from a library or a bug included, exits 1 with the hint to
    set ZOO_DEBUG=1 for the traceback. A ValueError subclass, so code that catches ValueError
    around a check still does.
    """
