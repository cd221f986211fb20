"""``python -m palign``: a run (:mod:`palign.cli.run`)."""

from palign.cli.run import main

if __name__ == "__main__":
    main()
