"""The login-node daemon: durable state, control API, reconcile loop."""
