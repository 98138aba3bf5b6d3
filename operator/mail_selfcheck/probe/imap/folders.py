"""Special folders of TO's mailbox and what the server is: one ``LIST`` per session.

Folders are found by their special-use attribute (RFC 6154: ``\\Junk``, ``\\Trash``,
``\\All``; Gmail and most servers send them), else by a known name, compared
case-insensitively and with any personal-namespace prefix (``INBOX.``, ``INBOX/``) removed.
The names cover the common providers and their localised variants (Gmail's ``[Gmail]/Bin``
in British English, Exchange's ``Junk Email``/``Deleted Items``, ...). Extra junk folder names
come from the settings (``MESSAGES_SELFCHECK_IMAP_JUNK_FOLDERS``).

Provider quirks are keyed on what the server advertises, never on its host name: Gmail is
the server that advertises ``X-GM-EXT-1`` (https://developers.google.com/gmail/imap/imap-extensions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

JUNK_FLAG = b"\\Junk"
TRASH_FLAG = b"\\Trash"
ALL_FLAG = b"\\All"

#: Known names of a junk folder (lower case, without namespace prefix).
JUNK_NAMES = (
    "junk", "spam", "junk email", "junk e-mail", "junk mail", "bulk mail", "[gmail]/spam", "[google mail]/spam",
    "junk-e-mail", "spam-verdacht", "courrier indésirable", "correo no deseado", "posta indesiderata",
    "ongewenste e-mail", "skräppost", "indesejados", "spamverdacht",
)
#: Known names of a trash folder (lower case, without namespace prefix).
TRASH_NAMES = (
    "trash", "deleted items", "deleted messages", "deleted", "bin", "[gmail]/trash", "[gmail]/bin",
    "[google mail]/trash", "[google mail]/bin", "papierkorb", "gelöschte elemente", "corbeille",
    "éléments supprimés", "papelera", "elementos eliminados", "cestino", "posta eliminata", "prullenbak",
    "verwijderde items", "papperskorgen", "lixo", "lixeira",
)
#: Known names of Gmail's "All Mail" (used only when no folder carries ``\\All``).
ALL_NAMES = ("[gmail]/all mail", "[google mail]/all mail", "[gmail]/alle nachrichten", "[gmail]/tous les messages")
_PREFIXES = ("inbox.", "inbox/")


@dataclass(frozen=True)
class Folders:
    """Special folders found in one ``LIST`` (``None``: the mailbox has none).

    ``gmail`` is true when the server advertises ``X-GM-EXT-1``: there INBOX is a label and a
    message lives on in ``\\All`` until it is moved to ``\\Trash``
    (https://support.google.com/mail/answer/7401).
    """

    junk: str | None = None
    trash: str | None = None
    all_mail: str | None = None
    gmail: bool = False
    extra_junk: tuple[str, ...] = field(default_factory=tuple)
    junk_all: tuple[str, ...] = field(default_factory=tuple)  # every junk folder, best first


def _bare(name: str) -> str:
    lower = name.lower()
    for prefix in _PREFIXES:
        if lower.startswith(prefix):
            return lower[len(prefix):]
    return lower


def classify(listing: list[tuple], *, gmail: bool = False, junk_names: tuple[str, ...] = ()) -> Folders:
    """Pick the junk, trash and all-mail folders out of a ``LIST`` result (pure).

    Args:
        listing: ``(flags, delimiter, name)`` tuples as returned by
            :meth:`imapclient.IMAPClient.list_folders`.
        gmail: the server advertises ``X-GM-EXT-1``.
        junk_names: extra junk folder names from the settings (matched like the known ones).

    Returns:
        The folders; a special-use attribute wins over a known name, an earlier known name
        over a later one; ``junk_all`` lists every junk folder in that order. Folders flagged ``\\Noselect`` / ``\\NonExistent`` are ignored.
    """
    usable = [
        (tuple(f.lower() if isinstance(f, bytes) else f for f in flags), str(name))
        for flags, _delim, name in listing
        if not {b"\\noselect", b"\\nonexistent"} & {f.lower() for f in flags if isinstance(f, bytes)}
    ]

    def pick(flag: bytes, names: tuple[str, ...]) -> str | None:
        for flags, name in usable:
            if flag.lower() in flags:
                return name
        by_name = {_bare(name): name for _flags, name in reversed(usable)}
        for wanted in names:
            if wanted.lower() in by_name:
                return by_name[wanted.lower()]
        return None

    def every(flag: bytes, names: tuple[str, ...]) -> tuple[str, ...]:
        found = [name for flags, name in usable if flag.lower() in flags]
        bare = {}
        for _flags, name in usable:
            bare.setdefault(_bare(name), []).append(name)
        for wanted in names:
            found += bare.get(wanted.lower(), [])
        return tuple(dict.fromkeys(found))

    extra = tuple(n for n in junk_names if n)
    return Folders(
        junk_all=every(JUNK_FLAG, extra + JUNK_NAMES),
        junk=pick(JUNK_FLAG, extra + JUNK_NAMES),
        trash=pick(TRASH_FLAG, TRASH_NAMES),
        all_mail=pick(ALL_FLAG, ALL_NAMES) if gmail else None,
        gmail=gmail,
        extra_junk=extra,
    )
