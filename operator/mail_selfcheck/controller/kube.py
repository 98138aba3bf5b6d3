"""The official ``kubernetes`` client, configured once for the operator.

Blocking calls of this client run in worker threads (``asyncio.to_thread``), never on
kopf's event loop. We use the official client (rather than the ``kubernetes_asyncio`` fork)
because kopf already logs in with it and it is the one the project depends on; the thread
pool (see :data:`mail_selfcheck.controller.handlers.API_THREADS`) bounds concurrency.
"""

from __future__ import annotations

from kubernetes import client, config


def api_client(pool_size: int = 32) -> client.ApiClient:
    """An ``ApiClient`` from in-cluster config, else ``$KUBECONFIG``/``~/.kube/config``.

    Raises:
        kubernetes.config.ConfigException: neither configuration is available.
    """
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)
