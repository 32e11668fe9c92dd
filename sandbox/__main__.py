"""`python -m sandbox`: run the sandbox marketplace from the command line."""

from sandbox.server import main

if __name__ == "__main__":
    raise SystemExit(main())
