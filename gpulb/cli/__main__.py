"""``python -m gpulb.cli``: the ``gpulb`` command, for children started with this interpreter."""

import sys

from gpulb.cli.main import main

sys.exit(main())
