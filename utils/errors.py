"""The one error type for bad input: scripts print it as one ``error:`` line and exit with code 2 (utils/cli)."""


class UserError(Exception):
    """Bad input from the user: a missing file, a damaged entry, a flag value that cannot work."""
