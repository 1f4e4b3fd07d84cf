"""Errors a user can cause, shown as one line without a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment.

    The message says what failed, on which value, and what to do. The CLI
    prints it alone and exits with status 2.
    """
