"""A launched worker whose rank 1 hangs (tests/test_distributed.py: a hung launch ends after its timeout)."""

import os
import sys
import time

from tasks.stages._launch import rank

if __name__ == "__main__":
    with rank(sys.argv[1]):
        if os.environ.get("RANK") == "1":
            time.sleep(3600)
