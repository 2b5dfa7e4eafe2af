"""Errors that fastquant reports to users as one line (exit code 2 from the CLI)."""


class FastquantError(Exception):
    """A problem with the user's input: bad arguments, missing files, bad data.

    The CLI prints ``error: <message>`` and exits with code 2, without a traceback.
    """
