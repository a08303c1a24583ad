"""``python -m kachery_tasks.cli``: the ``kachery`` command without the console script."""

from . import main

if __name__ == "__main__":
    main(prog_name="kachery")
