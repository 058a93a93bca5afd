"""`python -m pgolf.train`: see pgolf.train.main."""

import sys

from pgolf.train.main import main

sys.exit(main())
