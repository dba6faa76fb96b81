"""`python -m mellow_cli` runs the same command as `mellow` (also how torchrun starts training)."""

from mellow_cli.cli import main

if __name__ == "__main__":
    main()
