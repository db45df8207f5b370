"""Test-only fault hook, imported at start-up by a Python whose PYTHONPATH starts with this folder.

With ``RECS_FAULT_PAUSE_PARTS=<marker file>`` set, the first Redis pipeline
that writes a model part touches the marker and then sleeps, so a test can
SIGKILL a real ``python -m jobs.nightly`` while it is half-way through
publishing. Production code has no hook: this patches redis-py from outside.
"""

import os
import time
from pathlib import Path

_marker = os.environ.get("RECS_FAULT_PAUSE_PARTS")
if _marker:
    import redis.client

    _execute = redis.client.Pipeline.execute

    def _execute_then_pause(self, *args, **kwargs):
        writes_part = any(
            str(command[0][0]).upper() == "SET" and b":part:" in str(command[0][1]).encode()
            for command in self.command_stack
        )
        result = _execute(self, *args, **kwargs)
        if writes_part:
            Path(_marker).touch()
            time.sleep(120)
        return result

    redis.client.Pipeline.execute = _execute_then_pause
