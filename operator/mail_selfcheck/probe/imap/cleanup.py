"""Remove the probe's messages, and only those: what may be deleted, and how.

**What.** IMAP ``SEARCH HEADER`` is a substring match (RFC 3501 6.4.4), so a search for
``X-Selfcheck-Token <secret>/`` also finds another monitor's ``other-<secret>/...`` message.
A search result is therefore only a list of candidates: before anything is flagged, moved or
expunged, each candidate's ``X-Selfcheck-Token`` header is fetched
(``BODY.PEEK[HEADER.FIELDS (X-Selfcheck-Token)]``) and its whole value must be exactly
``<secret>/<32 lower-case hex digits>`` (exactly one such header field). Doomed are this
run's message (its nonce) and earlier runs' messages older than the sweep age.

**How**, keyed on what the server advertises (in this order):

* ``X-GM-EXT-1`` (Gmail): ``UID EXPUNGE`` in INBOX only removes a label and the message lives
  on in ``\\All`` ("All Mail"); deleting means moving it to the ``\\Trash`` special-use folder
  (https://support.google.com/mail/answer/7401, RFC 6154), where it is expunged in turn.
  Absence from ``\\All`` is then confirmed by ``Message-ID``.
* ``UIDPLUS``: ``STORE +FLAGS \\Deleted`` then ``UID EXPUNGE`` (RFC 4315 2.1) of exactly those UIDs.
* ``MOVE`` with a ``\\Trash`` folder: ``UID MOVE`` (RFC 6851) there, then the copy in Trash is
  found again by its exact token and removed like any other.
* otherwise: ``\\Deleted`` is set and a plain ``EXPUNGE`` (RFC 3501 6.4.3) is sent only when
  ``UID SEARCH DELETED`` holds nothing but the probe's own, verified messages; another
  client's ``\\Deleted`` mail is never expunged. (A client that flags a message between that
  SEARCH and the EXPUNGE, milliseconds apart, cannot be excluded without UIDPLUS.)
* a refused ``UID EXPUNGE`` (Microsoft 365 retention: ``NO EXPUNGE failed.``) leaves the
  messages flagged; the warning quotes the server's reply once.

Whatever of the probe's own doomed messages is still there at the end is counted
(:attr:`CleanupReport.leftover_count`, distinct messages by nonce) and described in the
warning. Mailboxes are never deleted.
"""

from __future__ import annotations

import imaplib
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.header import decode_header, make_header

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from ..message import TOKEN_HEADER
from .folders import Folders

NONCE = re.compile(r"[0-9a-f]{32}")
_HEADER_ITEM = f"BODY.PEEK[HEADER.FIELDS ({TOKEN_HEADER.upper()})]".encode()


@dataclass
class CleanupReport:
    """Outcome of a cleanup: ``warning`` (``None`` when clean) and ``leftover_count``: the
    number of the probe's own messages (this run's and swept earlier runs') still in the
    mailbox afterwards (``None`` when the cleanup could not look)."""

    warning: str | None = None
    leftover_count: int | None = 0


def token_values(header_block: bytes) -> list[str]:
    """Values of every ``X-Selfcheck-Token`` field in a raw header block (pure).

    Folded lines are joined with one space (RFC 5322 2.2.3) and encoded-words are decoded
    (RFC 2047; Python's email package encodes a long token that way), as a received copy is
    read by :func:`..message.verify_message`. Returns the values with surrounding whitespace
    stripped, in order; a value that cannot be decoded is returned as it is.
    """
    text = header_block.decode("ascii", "replace").replace("\r\n", "\n")
    text = re.sub(r"\n[ \t]+", " ", text)
    name = TOKEN_HEADER.lower() + ":"
    values = []
    for line in text.split("\n"):
        if line.lower().startswith(name):
            value = line[len(name):].strip()
            try:
                value = str(make_header(decode_header(value))).strip()
            except (ValueError, LookupError, UnicodeError):
                pass
            values.append(value)
    return values


def own_nonce(header_block: bytes, secret: str) -> str | None:
    """The nonce if ``header_block`` carries exactly one token header whose whole value is
    ``<secret>/<32 hex>``; else ``None`` (another monitor's message, or not a probe message)."""
    values = token_values(header_block)
    if len(values) != 1 or not values[0].startswith(secret + "/"):
        return None
    nonce = values[0][len(secret) + 1:]
    return nonce if NONCE.fullmatch(nonce) else None


@dataclass(frozen=True)
class Candidate:
    """A verified message of this probe: ``uid`` in the selected folder, its ``nonce``, age in seconds."""

    uid: int
    nonce: str
    age: float


def _header_block(item: dict) -> bytes:
    for key, value in item.items():
        if isinstance(key, bytes) and key.upper().startswith(b"BODY[HEADER.FIELDS") and value is not None:
            return bytes(value)
    return b""


def _aware(value) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def verified(client: IMAPClient, uids: list[int], secret: str) -> list[Candidate]:
    """Fetch the token header of ``uids`` in the selected folder and keep only the probe's own."""
    if not uids:
        return []
    data = client.fetch(sorted(uids), [_HEADER_ITEM, b"INTERNALDATE"])
    now = datetime.now(timezone.utc)
    out = []
    for uid, item in data.items():
        nonce = own_nonce(_header_block(item), secret)
        if nonce is None:
            continue
        date = _aware(item.get(b"INTERNALDATE"))
        out.append(Candidate(uid, nonce, (now - date).total_seconds() if date else 0.0))
    return sorted(out, key=lambda c: c.uid)


def _reply(exc: BaseException, command: str) -> str:
    """The server's reply text of an IMAPClient error (``"EXPUNGE failed: <reply>"``)."""
    text = str(exc)
    for prefix in (f"{command} failed: ", f"{command.upper()} failed: ", f"{command.lower()} failed: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


@dataclass
class _Run:
    client: IMAPClient
    server: str
    secret: str
    nonce: str
    sweep_older_than: float
    folders: Folders
    message_id: str | None
    notes: list[str] = field(default_factory=list)
    refused: dict[str, list[str]] = field(default_factory=dict)  # server reply -> folders
    left: dict[str, set[str]] = field(default_factory=dict)  # folder -> nonces still there
    flagged: set[str] = field(default_factory=set)  # folders where leftovers carry \Deleted
    moved_to_trash: bool = False

    def doomed(self, cand: Candidate) -> bool:
        return cand.nonce == self.nonce or cand.age > self.sweep_older_than

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def refuse(self, folder: str, exc: BaseException) -> None:
        folders = self.refused.setdefault(_reply(exc, "EXPUNGE"), [])
        if folder not in folders:
            folders.append(folder)

    def deletes_by_moving(self) -> bool:
        """True when deleting means moving to ``\\Trash`` (Gmail, or MOVE without UIDPLUS)."""
        caps = self.client.capabilities()
        return bool(self.folders.trash) and (self.folders.gmail or (b"MOVE" in caps and b"UIDPLUS" not in caps))

    # -- one folder ---------------------------------------------------------------------------
    def select(self, folder: str, readonly: bool = False) -> None:
        """SELECT ``folder``, unless the session already has it selected (read-write, or
        read-only as asked: a client that records ``selected``, as :class:`.session._Client`)."""
        if getattr(self.client, "selected", None) not in ((folder, False), (folder, readonly)):
            self.client.select_folder(folder, readonly=readonly)

    def candidates(self, folder: str, readonly: bool = False) -> list[Candidate]:
        self.select(folder, readonly)
        uids = self.client.search(["HEADER", TOKEN_HEADER, self.secret + "/"])
        return [c for c in verified(self.client, list(uids), self.secret) if self.doomed(c)]

    def clean(self, folder: str) -> None:
        doomed = self.candidates(folder)
        if not doomed:
            self.left.pop(folder, None)
            return
        uids = [c.uid for c in doomed]
        client, trash, caps = self.client, self.folders.trash, self.client.capabilities()
        self.left[folder] = {c.nonce for c in doomed}
        if folder != trash and self.deletes_by_moving():
            if b"MOVE" in caps:
                client.move(uids, trash)
            else:  # COPY, then \Deleted + UID EXPUNGE of the original (Gmail has UIDPLUS)
                client.copy(uids, trash)
                client.add_flags(uids, [b"\\Deleted"])
                client.uid_expunge(uids)
            self.moved_to_trash = True
            self.left.pop(folder, None)
            return
        client.add_flags(uids, [b"\\Deleted"])
        self.flagged.add(folder)
        if b"UIDPLUS" in caps:
            try:
                client.uid_expunge(uids)
            except IMAPClientError as exc:
                # refused (e.g. Microsoft 365 retention: "NO EXPUNGE failed."); a plain
                # EXPUNGE would be refused alike: leave them flagged and say so
                self.refuse(folder, exc)
                return
            self.left.pop(folder, None)
            return
        self._safe_expunge(folder)

    def _safe_expunge(self, folder: str) -> None:
        """Plain EXPUNGE, only if every ``\\Deleted`` message of ``folder`` is verified ours."""
        deleted = list(self.client.search(["DELETED"]))
        ours = {c.uid for c in verified(self.client, deleted, self.secret)}
        foreign = [u for u in deleted if u not in ours]
        if foreign:
            self.note(
                f"{len(foreign)} \\Deleted message(s) of other clients in {folder!r}, so no EXPUNGE was sent"
            )
            return
        try:
            self.client.expunge()
        except IMAPClientError as exc:
            self.refuse(folder, exc)
            return
        uids = list(self.client.search(["HEADER", TOKEN_HEADER, self.secret + "/"]))
        still = {c.nonce for c in verified(self.client, uids, self.secret)}
        remaining = self.left.get(folder, set()) & still
        if remaining:
            self.left[folder] = remaining
        else:
            self.left.pop(folder, None)

    def clean_safely(self, folder: str) -> None:
        """:meth:`clean`, noting a refused command (NO/BAD) instead of giving up; a broken
        connection still raises."""
        try:
            self.clean(folder)
        except imaplib.IMAP4.abort:
            raise
        except IMAPClientError as exc:
            self.note(f"IMAP server {self.server} refused a cleanup command in {folder!r}: {exc}")

    # -- Gmail: confirm absence from \All ---------------------------------------------------------
    def confirm_all_mail(self) -> None:
        all_mail = self.folders.all_mail
        if not all_mail:
            return
        self.moved_to_trash = False
        self.clean_safely(all_mail)  # earlier runs' copies (archived or label-expunged) go to Trash too
        if self.moved_to_trash and self.folders.trash:
            self.clean_safely(self.folders.trash)
        self.select(all_mail, readonly=True)
        remaining = set()
        if self.message_id:
            uids = list(self.client.search(["HEADER", "Message-ID", self.message_id]))
            remaining = {c.nonce for c in verified(self.client, uids, self.secret) if c.nonce == self.nonce}
        remaining |= {c.nonce for c in self.candidates(all_mail, readonly=True)}
        if remaining:
            self.left[all_mail] = remaining
            self.note(f"a copy remains in {all_mail!r} after moving to {self.folders.trash!r}")
        else:
            self.left.pop(all_mail, None)


def remove_probe_messages(
    client: IMAPClient,
    *,
    server: str,
    folders_to_clean: list[str],
    folders: Folders,
    secret: str,
    nonce: str,
    sweep_older_than: float,
    message_id: str | None = None,
) -> CleanupReport:
    """Delete this run's message and earlier runs' leftovers in ``folders_to_clean`` (then in
    Trash where the server deletes by moving there, then, on Gmail, in ``\\All``), following
    the module doc.

    Args:
        client: a logged-in session (not in IDLE); its selected folder changes.
        server: ``host:port`` for messages.
        folders_to_clean: the watched folder and junk folders, in order.
        folders: special folders of the mailbox (:func:`.folders.classify`).
        secret: the configured secret (token prefix).
        nonce: this run's nonce (always doomed).
        sweep_older_than: seconds; earlier runs' messages older than this are doomed.
        message_id: this run's Message-ID, to confirm absence from ``\\All`` (Gmail).

    Returns:
        The warning (``None`` when clean) and the number of own doomed messages left.

    Raises:
        OSError, imaplib.IMAP4.abort: the session broke (the caller may retry on a new one).
        IMAPClientError: a command outside the per-folder steps was refused (a refused step
            inside a folder becomes a note in the warning instead).
    """
    run = _Run(client, server, secret, nonce, sweep_older_than, folders, message_id)
    for folder in dict.fromkeys(folders_to_clean):
        if folder:
            run.clean_safely(folder)
    if folders.trash and folders.trash not in folders_to_clean and run.deletes_by_moving():
        # this run's moved copy, and earlier runs' (a server that deletes by expunging
        # never put the probe's mail there: no SELECT/SEARCH of Trash then)
        run.clean_safely(folders.trash)
    if folders.gmail:
        run.confirm_all_mail()
    for reply, where in run.refused.items():
        run.notes.insert(0, f"IMAP server {server} refused EXPUNGE in {', '.join(map(repr, where))}: {reply}")
    nonces = set().union(*run.left.values()) if run.left else set()
    if nonces:
        where = ", ".join(
            repr(f) + (" (only flagged \\Deleted, not expunged)" if f in run.flagged else "") for f in run.left
        )
        run.notes.append(f"{len(nonces)} probe message(s) left in {where}")
    warning = "; ".join(run.notes) or None
    return CleanupReport(warning, len(nonces))
