"""`python -m kmsproxy`: the same command line as `kmsproxy`."""

import sys

from kmsproxy.cli import main

if __name__ == "__main__":
    sys.exit(main())
