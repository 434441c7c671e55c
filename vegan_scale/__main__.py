"""``python -m vegan_scale ...`` is ``vegan-scale ...``; also the module ``accelerate launch -m`` starts."""

from vegan_scale.cli import run

run()
