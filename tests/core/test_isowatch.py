"""The checksum sensor's polling logic against the lab mirror: 304s when nothing changed, exactly the
published key when one did, failures isolated to their keys."""

import json
import socket
from collections import Counter

import pytest

from packer_assets.catalog import IsoSource
from packer_assets.upstream.isowatch import PollResult, poll


def sources_for(mirror):
    """One IsoSource per mirror item, as the catalog would give them (upstream URLs + the mirror)."""
    out = {}
    for key, item in mirror.items.items():
        if item.checksum_path:
            iso = IsoSource(url="https:/" + item.iso_path, checksum_url="https:/" + item.checksum_path)
        else:  # Windows: pinned
            iso = IsoSource(url="https:/" + item.iso_path, checksum="sha256:" + mirror.sha256(key))
        out[key] = iso.with_mirror(mirror.base_url)
    return out


def hits_since(mirror, before):
    return Counter({k: v for k, v in (mirror.hits - before).items() if v})


def test_first_poll_sees_every_key_once_and_the_cursor_is_json(iso_mirror):
    sources = sources_for(iso_mirror)
    result = poll(sources, {})
    assert set(result.first_seen) == set(sources) and not (result.changed or result.unchanged or result.errors)
    assert result.first_seen["rocky-9"] == "sha256:" + iso_mirror.sha256("rocky-9")
    assert result.first_seen["windows-2022"] == "sha256:" + iso_mirror.sha256("windows-2022")  # pinned: no fetch
    assert json.loads(json.dumps(result.cursor)) == result.cursor
    # rocky-9 and rocky-9-boot share CHECKSUM: fetched once
    assert sorted(path for path, status in iso_mirror.hits) == sorted(
        iso_mirror.items[k].checksum_path for k in ("ubuntu-2204", "debian-12", "rocky-9"))
    assert all(status == 200 and n == 1 for (_, status), n in iso_mirror.hits.items())


def test_unchanged_mirror_costs_only_304s(iso_mirror):
    sources = sources_for(iso_mirror)
    cursor = poll(sources, {}).cursor
    before = iso_mirror.hits.copy()
    result = poll(sources, json.loads(json.dumps(cursor)))  # as the sensor stores it
    assert not (result.changed or result.first_seen or result.errors)
    assert sorted(result.unchanged) == sorted(sources)
    new_hits = hits_since(iso_mirror, before)
    assert set(status for _, status in new_hits) == {304} and sum(new_hits.values()) == 3
    assert set(result.fetches.values()) == {"304"} and result.cursor == cursor


def test_publish_then_poll_reports_exactly_that_key(iso_mirror):
    sources = sources_for(iso_mirror)
    cursor = poll(sources, {}).cursor
    new = iso_mirror.publish("rocky-9")
    result = poll(sources, cursor)
    assert result.changed == {"rocky-9": f"sha256:{new}"}
    assert "rocky-9-boot" in result.unchanged  # same CHECKSUM file, same line for it
    assert result.cursor["rocky-9"]["checksum"] == f"sha256:{new}"
    again = poll(sources, result.cursor)
    assert not again.changed and set(again.fetches.values()) == {"304"}


def test_a_failing_url_is_reported_and_the_others_go_on(iso_mirror):
    sources = sources_for(iso_mirror)
    cursor = poll(sources, {}).cursor
    broken = iso_mirror.base_url + "/gone.example.org/SHA256SUMS"
    item = iso_mirror.items["debian-12"]
    sources["debian-12"] = IsoSource(url="https:/" + item.iso_path, checksum_url="https://gone.example.org/SHA256SUMS"
                                     ).with_mirror(iso_mirror.base_url)
    iso_mirror.publish("ubuntu-2204")
    result = poll(sources, cursor)
    assert list(result.errors) == ["debian-12"] and broken in result.errors["debian-12"]
    assert "HTTP 404" in result.errors["debian-12"]
    assert result.cursor["debian-12"] == cursor["debian-12"]  # old state kept for the next try
    assert list(result.changed) == ["ubuntu-2204"] and "rocky-9" in result.unchanged


def test_a_hanging_upstream_times_out_without_holding_up_the_rest(iso_mirror):
    sources = sources_for(iso_mirror)
    with socket.socket() as hang:
        hang.bind(("127.0.0.1", 0))
        hang.listen(8)
        url = f"http://127.0.0.1:{hang.getsockname()[1]}/SHA256SUMS"
        sources["stuck"] = IsoSource(url="https://stuck.example.org/x.iso", checksum_url=url)
        # 5 s: a loaded machine's mirror still answers well within it; the hanging one never does
        result = poll(sources, {}, timeout=5)
    assert list(result.errors) == ["stuck"] and "timed out after 5s" in result.errors["stuck"]
    assert "stuck" not in result.cursor and len(result.first_seen) == len(sources) - 1


def test_a_name_missing_from_its_file_is_an_error_for_that_key_only(iso_mirror):
    sources = sources_for(iso_mirror)
    cursor = poll(sources, {}).cursor
    item = iso_mirror.items["rocky-9"]
    sources["rocky-9"] = IsoSource(url="https:/" + item.iso_path.replace("9.4", "9.5"),
                                   checksum_url="https:/" + item.checksum_path).with_mirror(iso_mirror.base_url)
    result = poll(sources, cursor)
    assert list(result.errors) == ["rocky-9"] and "Rocky-9.5-x86_64-minimal.iso" in result.errors["rocky-9"]
    assert result.cursor["rocky-9"] == cursor["rocky-9"] and "rocky-9-boot" in result.unchanged
    # the next poll cannot send the shared validators (rocky-9's name changed): a plain GET, still an error
    assert poll(sources, result.cursor).fetches[sources["rocky-9"].effective_checksum_url] == "200"


def test_a_new_key_sharing_a_url_forces_a_full_fetch(iso_mirror):
    sources = sources_for(iso_mirror)
    without_boot = {k: v for k, v in sources.items() if k != "rocky-9-boot"}
    cursor = poll(without_boot, {}).cursor
    result = poll(sources, cursor)
    assert result.first_seen == {"rocky-9-boot": "sha256:" + iso_mirror.sha256("rocky-9-boot")}
    assert "rocky-9" in result.unchanged
    assert result.fetches[sources["rocky-9"].effective_checksum_url] == "200"


def test_pinned_keys_are_never_fetched_and_change_only_with_the_pin(iso_mirror):
    item = iso_mirror.items["windows-2022"]
    pinned = {"win": IsoSource(url="https:/" + item.iso_path, checksum="sha256:" + "ab" * 32)}
    cursor = poll(pinned, {}).cursor
    assert poll(pinned, cursor).unchanged == ["win"]
    repinned = {"win": IsoSource(url="https:/" + item.iso_path, checksum="sha256:" + "cd" * 32)}
    assert poll(repinned, cursor).changed == {"win": "sha256:" + "cd" * 32}
    assert not iso_mirror.hits


def test_a_changed_mirror_starts_over_without_stale_validators(iso_mirror):
    sources = sources_for(iso_mirror)
    cursor = poll(sources, {}).cursor
    moved = {k: v.with_mirror(iso_mirror.base_url.replace("127.0.0.1", "localhost")) for k, v in sources.items()}
    before = iso_mirror.hits.copy()
    result = poll(moved, cursor)
    assert sorted(result.unchanged) == sorted(sources) and not result.changed
    assert {status for _, status in hits_since(iso_mirror, before)} == {200}


def test_removed_keys_leave_the_cursor_and_junk_cursors_are_tolerated(iso_mirror):
    sources = sources_for(iso_mirror)
    cursor = dict(poll(sources, {}).cursor, retired={"checksum": "sha256:" + "00" * 32})
    cursor["debian-12"] = "garbage"
    result = poll(sources, cursor)
    assert "retired" not in result.cursor
    assert list(result.first_seen) == ["debian-12"]


@pytest.mark.parametrize("workers", [1, 3])
def test_bounded_workers_give_the_same_answer(iso_mirror, workers):
    sources = sources_for(iso_mirror)
    cursor = poll(sources, {}, max_workers=workers).cursor
    iso_mirror.publish("debian-12")
    assert poll(sources, cursor, max_workers=workers).changed.keys() == {"debian-12"}


def test_summary_says_what_a_poll_found():
    result = PollResult(cursor={}, changed={"rocky-9": "sha256:aa"}, unchanged=["a", "b"],
                        errors={"debian-12": "https://x/SHA256SUMS: 404"}, first_seen={"c": "sha256:bb"},
                        fetches={"https://x/SHA256SUMS": "error", "https://y/SUMS": "304", "https://z/SUMS": "200"})
    assert result.summary() == ("baseline of 1 source(s), 2 unchanged (1 checksum file(s) answered 304), 1 changed "
                                "(rocky-9), 1 failed (debian-12: https://x/SHA256SUMS: 404)")
    assert PollResult(cursor={}).summary() == "no ISO source in the catalog"
