"""Sub-commands of the `calib` CLI, one module each, each with ``register(subparsers)``."""
