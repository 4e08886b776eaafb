"""The one exception type users see."""


class VelcroError(Exception):
    """A problem with the user's input: the message names the input and the fix.

    The command line prints it as one line on stderr and exits with code 2.

    Example:
        >>> try:
        ...     velcro.plan(stats, 1.5)
        ... except velcro.VelcroError as error:
        ...     print(error)
        threshold 1.5 for site 'relu' is out of range; each threshold is a fraction in [0, 1]
    """
