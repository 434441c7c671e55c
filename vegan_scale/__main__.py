"""``python -m vegan_scale ...`` is ``vegan-scale ...``; also the module ``accelerate launch -m`` starts."""

import sys

from vegan_scale.cli import main

sys.exit(main())
