"""The one error type people see as a message, not a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix, named in the message (bad input, a stack that is not running, no data
    yet). Entry points print it on one line and exit with status 2; nothing stored was changed."""
