"""The MailSelfcheck operator (kopf): schedules probe Jobs and records their results in status.

* :mod:`.main` -- :func:`run_operator`, the ``mail-selfcheck operator`` entry point;
* :mod:`.handlers` -- kopf registration only;
* :mod:`.reconcile` -- the per-resource reconcile loop run by the daemon;
* :mod:`.schedule`, :mod:`.jobs`, :mod:`.status` -- pure logic (+ the Job API facade);
* :mod:`.metrics` -- Prometheus series.

Nothing here speaks SMTP or IMAP: the probe runs in the Job.
"""
