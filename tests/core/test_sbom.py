"""sbom.py: inventories (dpkg, rpm, Windows) to a CycloneDX 1.5 SBOM with purls, its schema validation, the diff."""

import copy
import json
from datetime import datetime, timedelta, timezone

import pytest
from packageurl import PackageURL

from packer_assets import __version__
from packer_assets.errors import OperationError
from packer_assets.inspection.sbom import (DPKG_QUERY, GUEST_UNKNOWN, RPM_QUERY, WINDOWS_QUERY, Package, SbomError, build_sbom, diff_sboms,
                                inventory_command, package_count, parse_dpkg, parse_inventory, parse_rpm,
                                parse_windows, purl, sbom_json, validate_sbom)

DPKG = (
    "ii \tbase-files\t12.4+deb12u5\tamd64\n"
    "ii \tlibc6\t2.36-9+deb12u4\tamd64\n"
    "ii \tlibc6\t2.36-9+deb12u4\ti386\n"
    "\n"
    "ii \tlibstdc++6\t12.2.0-14\tamd64\n"
    "ii \tlibgcrypt20\t1.10.1-3\tamd64\n"
    "ii \tperl-base\t5.36.0-7+deb12u1\tamd64\n"
    "ii \ttzdata\t2024a-0+deb12u1\tall\n"
    "ii \tbsdutils\t1:2.38.1-5+b1\tamd64\n"
    "rc \tlinux-image-6.1.0-17-amd64\t6.1.69-1\tamd64\n"
    "hi \topenssh-server\t1:9.2p1-2+deb12u2\tamd64\n"
)
RPM = (
    "bash\t0:5.1.8-9.el9\tx86_64\n"
    "openssl\t1:3.0.7-27.el9\tx86_64\n"
    "gpg-pubkey\t0:350d275d-6279464a\t(none)\n"
    "kernel-core\t0:5.14.0-362.24.1.el9_3\tx86_64\n"
    "kernel-core\t0:5.14.0-427.13.1.el9_4\tx86_64\n"
    "tzdata\t0:2024a-1.el9\tnoarch\n"
    "\n"
)
WINDOWS = "\ufeff" + json.dumps({
    "programs": [
        {"DisplayName": "Microsoft Visual C++ 2015-2022 Redistributable (x64) - 14.38.33130",
         "DisplayVersion": "14.38.33130.0", "Publisher": "Microsoft Corporation"},
        {"DisplayName": "Cloudbase-Init 1.1.4", "DisplayVersion": "1.1.4", "Publisher": "Cloudbase Solutions Srl"},
        {"DisplayName": "QEMU guest agent", "DisplayVersion": "", "Publisher": ""},
        {"DisplayName": "Cloudbase-Init 1.1.4", "DisplayVersion": "1.1.4", "Publisher": "Cloudbase Solutions Srl"},
    ],
    "hotfixes": [{"HotFixID": "KB5034439"}, {"HotFixID": "KB5034129"}],
})
WHEN = datetime(2024, 3, 1, 12, 30, tzinfo=timezone.utc)


def sbom(packages, family="debian", os_id="debian", **overrides):
    args = dict(family=family, os_id=os_id, os_version="12", template_name="debian-12-base", key="debian-12",
                chain_id="debian-12-20240301T123000Z", timestamp=WHEN)
    return build_sbom(packages, **(args | overrides))


# ------------------------------------------------------------------ parsers

def test_dpkg_keeps_installed_packages_with_name_version_and_arch():
    packages = parse_dpkg(DPKG)
    assert Package("libc6", "2.36-9+deb12u4", "deb", "i386") in packages
    assert Package("bsdutils", "1:2.38.1-5+b1", "deb", "amd64") in packages
    assert Package("openssh-server", "1:9.2p1-2+deb12u2", "deb", "amd64") in packages  # held, but installed
    assert all(p.name != "linux-image-6.1.0-17-amd64" for p in packages)  # removed, config files left
    assert len(packages) == 9


def test_rpm_drops_a_zero_epoch_keeps_others_and_skips_gpg_pubkey():
    packages = {(p.name, p.version): p for p in parse_rpm(RPM)}
    assert packages[("bash", "5.1.8-9.el9")] == Package("bash", "5.1.8-9.el9", "rpm", "x86_64", 0)
    assert packages[("openssl", "1:3.0.7-27.el9")].epoch == 1
    assert ("kernel-core", "5.14.0-362.24.1.el9_3") in packages and ("kernel-core", "5.14.0-427.13.1.el9_4") in packages
    assert all(name != "gpg-pubkey" for name, _ in packages)
    assert len(packages) == 5


def test_windows_programs_and_hotfixes_from_the_json():
    packages = parse_windows(WINDOWS)
    assert Package("Cloudbase-Init 1.1.4", "1.1.4", "windows-program", publisher="Cloudbase Solutions Srl") in packages
    assert Package("QEMU guest agent", "", "windows-program") in packages
    assert Package("KB5034439", "", "windows-hotfix") in packages
    assert len(packages) == 5  # the program listed in both registry views once


def test_windows_accepts_a_single_unwrapped_entry_and_no_hotfixes():
    text = json.dumps({"programs": {"DisplayName": "7-Zip", "DisplayVersion": "23.01"}, "hotfixes": None})
    assert parse_windows(text) == [Package("7-Zip", "23.01", "windows-program")]


@pytest.mark.parametrize("parse, text, wanted", [
    (parse_dpkg, "ii \tbash\t5.2.15-2+b2\tamd64\n\nii \tcoreutils\t9.1-1\n", "line 3: 3 tab-separated fields"),
    (parse_dpkg, "ii \tbash\t5.2.15-2+b2\tamd64\nii \tbash\t\tamd64\n", "line 2: field 3 is empty"),
    (parse_dpkg, "dpkg-query: error: failed to open package info file\n", "line 1: 1 tab-separated fields"),
    (parse_rpm, "bash\t0:5.1.8-9.el9\tx86_64\nopenssl\t3.0.7-27.el9\tx86_64\n", "line 2: '3.0.7-27.el9' is not"),
    (parse_rpm, "bash\t0:5.1.8-9.el9\tx86_64\n\n\ncurl\t0:7.76.1-26.el9 x\tx86_64\n", "line 4: field 2"),
    (parse_windows, '{"programs": [\n{"DisplayName": "a"},\n{"DisplayName": }]}', "line 3 column 17: not JSON"),
    (parse_windows, '{"programs": [{"DisplayName": "a"}, {"DisplayVersion": "1"}]}', "programs[1]: no DisplayName"),
    (parse_windows, '{"hotfixes": [{"HotFixID": "File 1"}]}', "hotfixes[0]: HotFixID 'File 1'"),
    (parse_windows, '[]', "expected a JSON object"),
    (parse_dpkg, "\n\n", "dpkg inventory is empty"),
    (parse_rpm, "gpg-pubkey\t0:350d275d-6279464a\t(none)\n", "rpm inventory is empty"),
])
def test_malformed_inventories_name_the_line_and_the_problem(parse, text, wanted):
    with pytest.raises(SbomError, match=None) as error:
        parse(text)
    assert wanted in str(error.value)
    assert isinstance(error.value, OperationError)


def test_the_command_and_the_parser_per_family():
    assert inventory_command("debian") == inventory_command("ubuntu") == DPKG_QUERY
    assert inventory_command("rocky") == RPM_QUERY
    windows = inventory_command("windows")
    assert windows == WINDOWS_QUERY and windows[:4] == ["powershell.exe", "-NoProfile", "-NonInteractive", "-Command"]
    assert '"' not in windows[4] and "\n" not in windows[4]  # survives cmd.exe quoting as one argument
    assert "Get-HotFix" in windows[4] and "WOW6432Node" in windows[4] and "ConvertTo-Json" in windows[4]
    assert parse_inventory("ubuntu", DPKG) == parse_dpkg(DPKG)
    assert parse_inventory("rocky", RPM) == parse_rpm(RPM)
    assert parse_inventory("windows", WINDOWS) == parse_windows(WINDOWS)
    with pytest.raises(SbomError, match="'freebsd'"):
        inventory_command("freebsd")


# ------------------------------------------------------------------ purls

@pytest.mark.parametrize("package, distro, wanted", [
    (Package("libc6", "2.36-9+deb12u4", "deb", "amd64"), "debian", "pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64"),
    (Package("bsdutils", "1:2.38.1-5+b1", "deb", "amd64"), "debian",
     "pkg:deb/debian/bsdutils@1%3A2.38.1-5%2Bb1?arch=amd64"),
    (Package("libstdc++6", "14.2.0-4ubuntu2~24.04", "deb", "amd64"), "ubuntu",
     "pkg:deb/ubuntu/libstdc%2B%2B6@14.2.0-4ubuntu2~24.04?arch=amd64"),
    (Package("bash", "5.1.8-9.el9", "rpm", "x86_64"), "rocky", "pkg:rpm/rocky/bash@5.1.8-9.el9?arch=x86_64"),
    (Package("openssl", "1:3.0.7-27.el9", "rpm", "x86_64", 1), "rocky",
     "pkg:rpm/rocky/openssl@3.0.7-27.el9?arch=x86_64&epoch=1"),
    (Package("gpg-pubkey-like", "1-2", "rpm"), "rocky", "pkg:rpm/rocky/gpg-pubkey-like@1-2"),
])
def test_purls_are_percent_encoded_and_decode_back(package, distro, wanted):
    text = purl(package, distro)
    assert text == wanted
    decoded = PackageURL.from_string(text)  # the reference implementation reads the same fields back
    assert (decoded.type, decoded.namespace, decoded.name) == (package.kind, distro, package.name)
    assert decoded.version == (package.version.split(":", 1)[1] if package.epoch else package.version)


def test_windows_components_have_no_purl():
    assert purl(Package("7-Zip", "23.01", "windows-program"), "mswindows") is None


# ------------------------------------------------------------------ the SBOM

def test_a_debian_sbom_is_valid_cyclonedx_1_5_with_the_template_in_its_metadata():
    bom = sbom(parse_dpkg(DPKG))
    validate_sbom(bom)
    assert (bom["bomFormat"], bom["specVersion"], bom["version"]) == ("CycloneDX", "1.5", 1)
    assert bom["serialNumber"].startswith("urn:uuid:")
    meta = bom["metadata"]
    assert meta["timestamp"] == "2024-03-01T12:30:00Z"
    assert meta["tools"]["components"][0] == {"type": "application", "name": "packer-assets", "version": __version__}
    assert (meta["component"]["type"], meta["component"]["name"], meta["component"]["version"]) == (
        "operating-system", "debian", "12")
    properties = {p["name"]: p["value"] for p in meta["component"]["properties"]}
    assert properties["packer-assets:template"] == "debian-12-base"
    assert properties["packer-assets:key"] == "debian-12"
    assert properties["packer-assets:chain-id"] == "debian-12-20240301T123000Z"
    libc = [c for c in bom["components"] if c["name"] == "libc6"]
    assert [c["bom-ref"] for c in libc] == ["pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64",
                                            "pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=i386"]
    assert libc[0]["type"] == "library" and libc[0]["purl"] == libc[0]["bom-ref"]
    assert {"name": "packer-assets:arch", "value": "i386"} in libc[1]["properties"]
    names = [(c["name"], c["version"]) for c in bom["components"]]
    assert names == sorted(names) and package_count(bom) == 9


def test_rocky_and_windows_sboms_are_valid_too():
    rocky = sbom(parse_rpm(RPM), family="rocky", os_id="rocky", os_version="9.3")
    validate_sbom(rocky)
    assert "pkg:rpm/rocky/openssl@3.0.7-27.el9?arch=x86_64&epoch=1" in {c["purl"] for c in rocky["components"]}
    windows = sbom(parse_windows(WINDOWS), family="windows", os_id="mswindows", os_version="2022")
    validate_sbom(windows)
    by_ref = {c["bom-ref"]: c for c in windows["components"]}
    assert by_ref["win:Cloudbase-Init 1.1.4@1.1.4"]["type"] == "application"
    assert by_ref["win:Cloudbase-Init 1.1.4@1.1.4"]["publisher"] == "Cloudbase Solutions Srl"
    assert "version" not in by_ref["win:KB5034439"] and "purl" not in by_ref["win:KB5034439"]
    assert "win:QEMU guest agent" in by_ref and package_count(windows) == 5


def test_the_same_inputs_give_the_same_bytes():
    packages = parse_dpkg(DPKG)
    first = sbom_json(sbom(packages))
    assert sbom_json(sbom(list(reversed(packages)) + packages[:2])) == first  # order and repeats do not matter
    assert json.loads(first)["serialNumber"] == sbom(packages, chain_id="debian-12-20240301T123000Z")["serialNumber"]
    assert sbom(packages, chain_id="debian-12-20240302T000000Z")["serialNumber"] != json.loads(first)["serialNumber"]
    local = WHEN.astimezone(timezone(timedelta(hours=2)))
    assert sbom_json(sbom(packages, timestamp=local)) == first  # the timestamp is written in UTC
    with pytest.raises(SbomError, match="no time zone"):
        sbom(packages, timestamp=datetime(2024, 3, 1))


def broken(change):
    bom = sbom(parse_dpkg(DPKG))
    change(bom)
    return bom


@pytest.mark.parametrize("change, wanted", [
    (lambda b: b["components"][2].pop("name"), "$.components[2]: 'name' is a required property"),
    (lambda b: b.update(specVersion="9.9"), "$.specVersion: '9.9' is not '1.5'"),
    (lambda b: b["components"][0].update(type="package"), "$.components[0].type: 'package' is not one of"),
    (lambda b: b.update(serialNumber="12345"), "$.serialNumber: '12345' does not match"),
    (lambda b: b["metadata"].update(timestamp="yesterday"), "$.metadata.timestamp: 'yesterday' is not a 'date-time'"),
    (lambda b: b.update(extra=1), "$: Additional properties are not allowed ('extra' was unexpected)"),
    (lambda b: b["components"].append(copy.deepcopy(b["components"][0])), "bom-ref not unique: pkg:deb/debian/"),
])
def test_a_broken_sbom_fails_validation_naming_the_path(change, wanted):
    with pytest.raises(SbomError) as error:
        validate_sbom(broken(change))
    assert wanted in str(error.value)


def test_validation_lists_only_the_first_errors():
    bom = sbom(parse_dpkg(DPKG))
    for component in bom["components"]:
        del component["name"]
    with pytest.raises(SbomError) as error:
        validate_sbom(bom)
    assert str(error.value).count("'name' is a required property") == 5 and str(error.value).endswith("and 4 more schema errors")


# ------------------------------------------------------------------ diff

def test_diff_added_removed_changed_by_name_and_arch():
    before = sbom(parse_dpkg(DPKG))
    after_text = (DPKG.replace("libc6\t2.36-9+deb12u4\tamd64", "libc6\t2.36-9+deb12u5\tamd64")
                  .replace("ii \ttzdata\t2024a-0+deb12u1\tall\n", "")
                  + "ii \tcurl\t7.88.1-10+deb12u5\tamd64\n")
    diff = diff_sboms(before, sbom(parse_dpkg(after_text)))
    assert diff.changed == [("libc6", "2.36-9+deb12u4", "2.36-9+deb12u5")]  # the i386 one did not change
    assert diff.removed == [("tzdata", "2024a-0+deb12u1")]
    assert diff.added == [("curl", "7.88.1-10+deb12u5")]
    assert diff.counts == {"added": 1, "removed": 1, "changed": 1}
    text = diff.markdown()
    assert "| changed | libc6 | 2.36-9+deb12u4 | 2.36-9+deb12u5 |" in text
    assert "| added | curl | - | 7.88.1-10+deb12u5 |" in text and "| removed | tzdata | 2024a-0+deb12u1 | - |" in text
    assert text.splitlines()[0] == "1 added, 1 removed, 1 changed"


def test_diff_of_a_second_kernel_is_an_addition_not_a_change():
    before = sbom(parse_rpm(RPM.replace("kernel-core\t0:5.14.0-427.13.1.el9_4\tx86_64\n", "")), family="rocky",
                  os_id="rocky")
    diff = diff_sboms(before, sbom(parse_rpm(RPM), family="rocky", os_id="rocky"))
    assert (diff.added, diff.removed, diff.changed) == ([("kernel-core", "5.14.0-427.13.1.el9_4")], [], [])


def test_diff_none_first_and_the_limit():
    bom = sbom(parse_dpkg(DPKG))
    same = diff_sboms(bom, copy.deepcopy(bom))
    assert same.counts == {"added": 0, "removed": 0, "changed": 0} and same.markdown() == "no changes"
    first = diff_sboms(None, bom)
    assert first.first and first.markdown() == "first template of this key (9 packages)" and len(first.added) == 9
    many = diff_sboms(sbom([Package("bash", "5.2", "deb", "amd64")]), bom)
    text = many.markdown(limit=3)
    assert text.count("\n| added |") == 3 and text.endswith("... and 7 more")
    pipe = diff_sboms(bom, sbom(parse_windows('{"programs": [{"DisplayName": "a|b", "DisplayVersion": "1"}]}'),
                                family="windows", os_id="mswindows"))
    assert "| added | a\\|b | - | 1 |" in pipe.markdown(limit=100)


def test_the_sbom_says_what_guest_its_packages_were_read_from_and_unknown_when_nobody_said():
    def guest_property(bom):
        return {p["name"]: p["value"] for p in bom["metadata"]["component"]["properties"]}["packer-assets:guest"]

    noted = sbom(parse_dpkg(DPKG), guest="lab: simulated guest (the lab answers for the installed system)")
    validate_sbom(noted)
    assert guest_property(noted) == "lab: simulated guest (the lab answers for the installed system)"
    assert guest_property(sbom(parse_dpkg(DPKG))) == GUEST_UNKNOWN
