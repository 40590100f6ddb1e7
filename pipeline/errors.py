"""The one exception type for bad user input."""


class UserError(Exception):
    """Bad input from the user (a file, a field, a value).

    The message is the single line shown to the user: it names what is wrong and what to do.
    Entry points under ``launch/`` print it as ``error: <message>`` and exit with code 2.
    """

    exit_code = 2
