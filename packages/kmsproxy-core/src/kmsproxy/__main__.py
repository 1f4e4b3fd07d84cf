"""`python -m kmsproxy`: the same command line as `kmsproxy`."""

from kmsproxy.cli import run

if __name__ == "__main__":
    run()
