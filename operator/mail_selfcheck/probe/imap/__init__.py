"""TO's mailbox over IMAP4rev1 (RFC 3501): session, folders, arrival detection, cleanup.

* :mod:`.session` -- connect, TLS, login, per-command timeouts, reconnect; :class:`Mailbox`.
* :mod:`.folders` -- special-use folders (RFC 6154) and known names; provider detection.
* :mod:`.detect` -- arrival detection strategies.
* :mod:`.cleanup` -- what may be deleted (exact token check) and how.
"""

from .cleanup import CleanupReport
from .session import Found, Mailbox

__all__ = ["CleanupReport", "Found", "Mailbox"]
