"""The daemon as a service: the socket loop (server), the data plane and the
control plane, the run registry, the policy engine, and the store."""
