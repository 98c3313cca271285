"""``python -m greyfox cache export FILE``: the same as the ``greyfox`` command."""

from ._cli import main

raise SystemExit(main())
