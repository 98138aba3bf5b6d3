"""Server-matrix stacks (see the modules): Cyrus IMAP, Courier-IMAP, GreenMail, on loopback."""
