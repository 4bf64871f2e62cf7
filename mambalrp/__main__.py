"""``python -m mambalrp``: the command line (see :mod:`mambalrp.cli`)."""

from mambalrp.cli import main

raise SystemExit(main())
