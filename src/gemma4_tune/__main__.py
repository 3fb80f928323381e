"""``python -m gemma4_tune``: the CLI."""

from gemma4_tune.cli import main

if __name__ == "__main__":
    main()
