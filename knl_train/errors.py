"""The one exception type the CLI turns into a message instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: the message names the bad thing and says what to do."""
