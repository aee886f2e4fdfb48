"""The one exception type for bad user input: the CLI prints its message on one line, exit 2."""


class CmmergeError(Exception):
    """A problem the user can fix (bad path, option or data); the message says what and where."""
