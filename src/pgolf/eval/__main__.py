"""`python -m pgolf.eval`: see pgolf.eval.run."""

import sys

from pgolf.eval.run import main

sys.exit(main())
