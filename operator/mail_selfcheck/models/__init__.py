"""Shared vocabulary of the probe and the controller.

* :mod:`.settings` -- :class:`ProbeSettings`, the probe's configuration (environment variables).
* :mod:`.result` -- :class:`ProbeResult`, what one probe run reports.
* :mod:`.spec` -- the ``MailSelfcheck`` custom resource spec and status (CRD source of truth).

Import the sub-module you need; this package imports nothing on its own so the probe does
not pay for the CRD models and the controller does not pay for the settings loader.
"""
