"""``python -m peftlite``: the same as the ``peftlite`` command."""

from .cli import main

raise SystemExit(main())
