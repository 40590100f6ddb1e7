"""The one exception type for bad user input, and how entry points report it."""
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (a file, a field, a value).

    The message is the single line shown to the user: it names what is wrong and what to do.
    Entry points under ``launch/`` print it as ``error: <message>`` and exit with code 2.
    """

    exit_code = 2


class JobFault(Exception):
    """A fault of the job, not of its input (a rank lost mid-run): one line `error: ...`, exit code 1."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def exit_code_of(action: Callable[[], object]) -> int:
    """Run an entry point's work and return its exit code: the int it returns, else 0; a UserError (or JobFault)
    becomes one line `error: ...` on stderr and its exit code (2, or 1)."""
    try:
        result = action()
        return result if isinstance(result, int) else 0
    except (UserError, JobFault) as exc:
        one_line = " ".join(str(exc).split())   # a message quoting a file or a parser may hold newlines
        if one_line:   # empty: another rank reports the same fault
            print(f"error: {one_line}", file=sys.stderr, flush=True)
        return exc.exit_code
