"""docs/configuration.md is the schema's own reference: regenerated, it is unchanged, and it names every key."""

from __future__ import annotations

from tests.paths import ROOT
from vegan_scale.config.fields import describe
from vegan_scale.config.reference import markdown
from vegan_scale.experiment import ExperimentConfig

REFERENCE = ROOT / "docs" / "configuration.md"
REGENERATE = ".venv/bin/python -m vegan_scale config --reference > docs/configuration.md"


def test_reference_is_up_to_date() -> None:
    assert REFERENCE.exists(), f"{REFERENCE} is missing; write it with `{REGENERATE}`"
    assert REFERENCE.read_text() == markdown(ExperimentConfig), (
        f"docs/configuration.md differs from the schema; regenerate it with `{REGENERATE}` and commit it"
    )


def test_reference_names_every_key() -> None:
    text = REFERENCE.read_text()
    keys = [key for key, *_ in describe(ExperimentConfig)]
    assert len(keys) > 50, keys
    missing = [key for key in keys if f"| `{key}` |" not in text]
    assert not missing, f"keys missing from docs/configuration.md (regenerate it with `{REGENERATE}`): {missing}"
