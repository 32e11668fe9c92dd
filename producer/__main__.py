"""`python -m producer` is the `irlive` command."""

import sys

from producer.cli import main

sys.exit(main())
