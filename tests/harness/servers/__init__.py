"""Server-matrix stacks: real IMAP servers other than Dovecot, on loopback, state in temp dirs.

=============  ==============================================  ===================================
module         server (source)                                 in front / delivery
=============  ==============================================  ===================================
``cyrus``      Cyrus IMAP 3.6.1 (Debian 12 ``cyrus-imapd``)    Postfix 3.7 -> LMTP (Unix socket)
``courier``    Courier-IMAP 5.0.13 (Debian 12 ``courier-imap``) Postfix 3.7 virtual(8) -> Maildir
``greenmail``  GreenMail 2.1.13 (Maven Central standalone jar)  its own SMTP/SMTPS
=============  ==============================================  ===================================

Installation: ``bash hack/install-servers.sh`` (idempotent; ~4 s cold, ~0.05 s warm) fills
``~/.cache/mail-selfcheck/servers``; the stacks call it themselves (``common.ensure_installed``).
The Cyrus and Courier packages are unpacked (``apt-get download`` + ``dpkg-deb -x``), never
installed: they conflict with the installed ``dovecot-imapd``.

Every stack has the ``MailStack`` shape the tests rely on: ``start()``/``stop()``/context
manager, ``users`` (short name -> ``User(address, password)``), ``secret``, ``ca_file``,
``probe_env(from_user, to_user, smtp_security, imap_security, **overrides)`` (see
``tests/harness/mailstack.py``), ``imap_port``/``imaps_port``/``submissions_port``,
``logs(lines)``, ``version`` and ``view`` (``common.ImapView``: the test's own IMAP client).
``fixtures`` exposes them to pytest (``matrix_server``); ``python -m tests.harness.servers
<server> up`` runs one in the foreground and prints the probe's ``export`` lines.

Needs root with mount namespaces (``unshare``/``nsenter``, overlayfs): Courier's
authentication library and Cyrus' syslog use compiled-in paths, which a private mount
namespace redirects into the temp dir.
"""
