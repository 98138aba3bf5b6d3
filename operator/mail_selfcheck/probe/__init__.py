"""The probe: one end-to-end selfcheck of a mail stack (SMTP submission -> IMAP mailbox).

Nothing below this package imports Kubernetes or kopf: the probe runs the same inside a
Job, in a plain container (``run --loop``) or by hand.

* :mod:`.message` -- build the probe message, verify a received copy (pure functions).
* :mod:`.smtp` -- submission with TLS modes, AUTH, 4xx retry.
* :mod:`.imap` -- mailbox check, arrival detection, fetch, cleanup.
* :mod:`.run` -- the seven steps, timings, the :class:`~mail_selfcheck.models.result.ProbeResult`.
* :mod:`.report` -- the ``selfcheck_completed`` log line and the heartbeat webhook.
* :mod:`.main` -- glue for ``mail-selfcheck run``.
"""
