"""``python -m CoreDiffLib``: the ``corediff`` command, where its script is not on the PATH."""
from .cli import main

raise SystemExit(main())
