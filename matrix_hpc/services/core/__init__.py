"""The service core: what every gRPC service of a run does the same way.

- ``listen``: where a replica listens (a Unix socket in an owner-only folder on one machine; the
  node's address over TLS on a cluster) and what a client checks before it trusts an address;
- ``server``: the grpc.aio server of one replica (credentials, health, binding, shutdown);
- ``deploy``: replicas as Ray actors (placement, start, restart, stop): ``ServiceReplica``,
  ``start_replicas``;
- ``endpoint``: the picklable ``ServiceEndpoint`` agents receive, and its ``shutdown``;
- ``replicas``: the client side, one ``ReplicaSet`` per endpoint and event loop (channels,
  balancing, affinity, health probes, finding a restarted replica);
- ``errors``: ``ServiceError``.

A new kind of service is a folder beside ``llm/`` and ``sandbox/``: its spec, a servicer with
``serve_at(address, secret=, tls=)`` built on ``GrpcHost``, a ``ServiceReplica`` subclass with
``make_server()``, a ``deploy`` calling ``start_replicas``, an endpoint subclassing
``ServiceEndpoint`` and a client on ``replica_set``; then a line in ``matrix_hpc/services/__init__.py``.
"""
