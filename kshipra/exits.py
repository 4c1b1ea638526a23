"""The exit codes of every ``kshipra`` command (the README's table).

Scripts branch on them: ``2`` means fix the command or the file, ``3`` the token, ``4`` try
again later, ``5`` a purge that no edge applied.
"""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
"""Anything else that went wrong."""
EXIT_BAD_INPUT: Final = 2
"""The command line, the file or the request is wrong (a 4xx other than auth)."""
EXIT_AUTH: Final = 3
"""The token is missing or wrong (401/403)."""
EXIT_SERVER: Final = 4
"""The origin or Redis failed or could not be reached; retrying later may work."""
EXIT_NOT_APPLIED: Final = 5
"""A purge was published but no live edge applied it."""
