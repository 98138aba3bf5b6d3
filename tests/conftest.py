"""Root conftest: registers the fixtures of the real test tiers.

* ``tests.harness.mail_fixtures``: a real Postfix + Dovecot stack on loopback ports.
* ``tests.harness.cluster_fixtures``: a real etcd + kube-apiserver + kube-controller-manager
  control plane with a node agent standing in for the kubelet.
* ``tests.harness.node_fixtures``: the real-node tier (``tests/node/``, marker ``node``):
  kube-scheduler + kubelet + containerd + runc + CNI in a network namespace with no route out.
"""

pytest_plugins = [
    "tests.harness.mail_fixtures",
    "tests.harness.cluster_fixtures",
    "tests.harness.servers.fixtures",
    "tests.harness.node_fixtures",
]

