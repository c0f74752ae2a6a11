from __future__ import annotations

import sys

from guestwarden.cli import main

sys.exit(main())
