"""kopf registration facts the operator relies on (no cluster needed)."""

from __future__ import annotations

import kopf

from mail_selfcheck.controller import handlers


def _spawning():
    return kopf.get_default_registry()._spawning.get_all_handlers()


def test_the_daemon_requires_no_finalizer():
    """Deleting a MailSelfcheck must never wait for the operator (after `helm uninstall`, in a crash loop).

    Fails when a kopf upgrade changes the registry structure that
    :func:`handlers._daemon_without_finalizer` relies on.
    """
    (daemon,) = [h for h in _spawning() if h.fn is handlers.selfcheck]
    assert daemon.requires_finalizer is False


def test_watches_are_filtered_by_the_api_server():
    assert handlers.MANAGED_SELECTOR == "app.kubernetes.io/managed-by=mail-selfcheck-operator"


def test_kopf_never_gives_up_on_api_requests():
    """A 403 in one watched namespace (re-created without its Role) must not end the operator."""
    import itertools

    backoffs = handlers.RetryForever()
    first = list(itertools.islice(backoffs, 50))
    assert first[:8] == [1, 1, 2, 3, 5, 8, 13, 21] and set(first[8:]) == {30}
    assert list(itertools.islice(backoffs, 3)) == [1, 1, 2], "a fresh sequence for every request"
    assert not hasattr(backoffs, "__len__")
