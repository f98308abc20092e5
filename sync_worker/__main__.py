"""``python -m sync_worker`` is the ``sync-worker`` command."""
import sys

from sync_worker.cli import main

sys.exit(main())
