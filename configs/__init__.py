"""calib's shipped configs, installed as the package ``calib.configs`` (see ``calib.resources``).

Data only: ``models/``, ``hardware/``, ``mfu/`` and ``datasets/``.  Read them
through :func:`calib.resources.config_path`, never by a path relative to the
source tree.
"""
