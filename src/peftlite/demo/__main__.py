"""``python -m peftlite.demo``."""

from .run import main

raise SystemExit(main())
