"""`python -m gitcli ...` (also what `torchrun -m gitcli train ...` runs)."""

from gitcli.cli import main

if __name__ == "__main__":
    main()
