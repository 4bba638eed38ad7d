from datetime import UTC, datetime, timedelta, timezone

import pytest

from packer_assets.evidence.chain import ChainIdError, check_key, log_header, new_chain_id, parse_chain_id, utc_stamp
from packer_assets.errors import ConfigError


def test_chain_id_format_and_round_trip():
    when = datetime(2026, 11, 25, 19, 4, 5, tzinfo=UTC)
    chain = new_chain_id("ubuntu-2204", when)
    assert str(chain) == "CHAIN-20261125T190405Z-ubuntu-2204"
    assert parse_chain_id(str(chain)) == chain
    assert chain.started_at == when


def test_stamp_is_utc_whatever_the_input_zone():
    when = datetime(2026, 11, 25, 21, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    assert utc_stamp(when) == "20261125T190000Z"


def test_naive_datetime_is_refused():
    with pytest.raises(ValueError, match="naive"):
        utc_stamp(datetime(2026, 1, 1))


@pytest.mark.parametrize("bad", ["CHAIN-2026-ubuntu", "chain-20261125T190405Z-x", "CHAIN-20261125T190405Z-Bad_Key",
                                 "CHAIN-20261125T190405Z-ubuntu-2204\n"])
def test_malformed_chain_ids_are_refused(bad):
    with pytest.raises(ValueError, match="not a chain ID"):
        parse_chain_id(bad)


@pytest.mark.parametrize("bad", ["../../etc", "CHAIN-20261125T190405Z-debian-12\n", "CHAIN-x\nCHAIN-y", "x" * 500])
def test_a_bad_chain_id_is_one_line_of_the_projects_errors(bad):
    """`packer-assets chain ../../etc` was a ValueError traceback: now a ConfigError the CLI prints as one line."""
    with pytest.raises(ChainIdError) as err:
        parse_chain_id(bad)
    assert isinstance(err.value, ConfigError) and isinstance(err.value, ValueError)  # old `except ValueError` holds
    assert "\n" not in str(err.value) and len(str(err.value)) < 200


@pytest.mark.parametrize("bad", ["../../etc", "debian-12\n", "Debian", "", "a/b"])
def test_a_key_that_is_not_a_folder_name_is_refused(bad):
    with pytest.raises(ChainIdError, match="not a template key"):
        check_key(bad)
    assert check_key("debian-12") == "debian-12"


def test_bad_key_cannot_make_a_chain_id():
    with pytest.raises(ValueError):
        new_chain_id("Ubuntu 22.04")


def test_log_header():
    assert log_header("CHAIN-20261125T190405Z-rocky-9", "build") == "[CHAIN-20261125T190405Z-rocky-9] [build]"


def test_fresh_chain_id_waits_for_a_free_second():
    from packer_assets.evidence.chain import fresh_chain_id

    seen = []
    first = fresh_chain_id("debian-12", lambda stamp: False)
    second = fresh_chain_id("debian-12", lambda stamp: seen.append(stamp) or stamp == first.stamp)
    assert second.stamp > first.stamp or second.stamp not in {first.stamp}
    assert second.stamp != first.stamp
