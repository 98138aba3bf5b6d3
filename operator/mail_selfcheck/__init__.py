"""mail-selfcheck: prove end to end that a mail stack delivers mail.

Sub-packages:

* :mod:`mail_selfcheck.probe` -- the selfcheck itself (SMTP submission, IMAP reception,
  integrity, cleanup, report). Imports nothing from Kubernetes.
* :mod:`mail_selfcheck.controller` -- the kopf operator that runs the probe as Jobs and
  writes results into ``MailSelfcheck.status``. Knows nothing of SMTP or IMAP.
* :mod:`mail_selfcheck.models` -- the shared vocabulary: probe settings, probe result,
  MailSelfcheck spec.
"""

__version__ = "0.2.0"
