"""The one exception type users see."""


class VelcroError(Exception):
    """A problem with the user's input: the message names the input and the fix.

    The command line prints it as one line on stderr and exits with code 2.
    """
