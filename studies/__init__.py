"""calib's shipped study files, installed as the package ``calib.study_files`` (see ``calib.resources``).

Data only: one ``<name>.yaml`` per study.  Read them through
:func:`calib.resources.study_file`.
"""
