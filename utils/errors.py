"""The project's one exception for bad input. It imports nothing of the project's, so that any module (utils.cli,
utils.speed, ...) can raise it without importing another."""


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2, no traceback."""
