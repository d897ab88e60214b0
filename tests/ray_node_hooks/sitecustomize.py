"""Fault hook for the test Ray cluster's own processes (on their PYTHONPATH only; never imported by the suite).

Python imports ``sitecustomize`` at start-up. When ``DRIVEVLA_TEST_FAIL_CLIENT_SERVER`` names a
file that exists, the next Ray Client server process started for a driver (``--mode=specific-server``,
started by the cluster's Ray Client proxy, ray/util/client/server/proxier.py) takes the file
(an atomic rename, so exactly one process does) and exits at once, as such a process was seen
to die in CI. Everything else starts untouched.
"""

import os

_flag = os.environ.get("DRIVEVLA_TEST_FAIL_CLIENT_SERVER")
if _flag and os.path.exists(_flag):
    try:
        with open("/proc/self/cmdline", "rb") as _f:
            _argv = _f.read().split(b"\0")
    except OSError:
        _argv = []
    if b"--mode=specific-server" in _argv:
        try:
            os.rename(_flag, _flag + ".taken")
        except OSError:
            pass  # another process took it
        else:
            os._exit(1)
