"""The configuration reference in docs/ lists every LongExposureConfig field with its default."""

import dataclasses
import re
from pathlib import Path

from lecompile import LongExposureConfig
from lecompile.config import Tuning

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_configuration_reference_matches_the_dataclasses():
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \| `(\w+)` \|", (DOCS / "configuration.md").read_text(), re.M)
    documented = {name: (default, env) for name, default, env in rows}
    public = [f for f in dataclasses.fields(LongExposureConfig) if not f.name.startswith("_")]
    fields = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in [*public, *dataclasses.fields(Tuning)]}
    assert list(documented) == list(fields), "docs/configuration.md: fields missing, extra or out of order"
    for name, default in fields.items():
        assert documented[name] == (repr(default), f"LECOMPILE_{name.upper()}"), name


def test_docs_index_links_resolve():
    for link in re.findall(r"\]\(([\w.-]+\.md)\)", (DOCS / "README.md").read_text()):
        assert (DOCS / link).exists(), link
