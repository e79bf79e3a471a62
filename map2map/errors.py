"""The one exception type that means "the user asked for something wrong".

The command line turns a `UserError` into one line on stderr and exit status 2,
without a traceback; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a one-line message naming the value and what was expected."""
