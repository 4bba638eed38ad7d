"""The end_of_life check's evaluation on its own (the build and the up-to-date run that evaluate it against the
lab are in tests/defs/test_defs_template.py): the clock is catalog.eol.today, fixed here."""

from datetime import date

import dagster as dg
import pytest
from support import REPO

from packer_assets.catalog import load_catalog
from packer_assets.defs.assets import end_of_life_check


@pytest.fixture
def debian():
    return load_catalog(REPO / "templates/catalog.yaml", env={}, project_dir=REPO).get("debian-12")


def on(monkeypatch, day: date) -> None:
    monkeypatch.setattr("packer_assets.catalog.eol.today", lambda: day)


def test_the_last_supported_day_passes_with_the_date_and_the_next_day_warns(monkeypatch, debian):
    on(monkeypatch, date(2028, 6, 30))
    check = end_of_life_check(debian)
    assert check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.description == "debian-12: end of life 2028-06-30 (0 days left on 2028-06-30)"
    assert check.metadata["eol"].value == "2028-06-30" and check.metadata["days_past"].value == 0
    on(monkeypatch, date(2028, 7, 1))
    check = end_of_life_check(debian)
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.description == ("debian-12: past end of life since 2028-06-30 (1 day on 2028-07-01): the template "
                                 "still builds and stays promoted; move to a supported release")
    assert check.metadata["days_past"].value == 1 and check.metadata["today"].value == "2028-07-01"


def test_a_key_without_an_end_of_life_date_passes_saying_so(monkeypatch, debian):
    """eol is optional: an entry without one passes (a WARN on every such key of a site's catalog would be
    noise people learn to ignore); the evaluation says the catalog names none."""
    on(monkeypatch, date(2100, 1, 1))
    check = end_of_life_check(debian.model_copy(update={"eol": None}))
    assert check.passed and check.description == "debian-12: no end-of-life date in the catalog"
    assert check.metadata["eol"].value == "none"
