"""The toolkit's names (automation user, role, token name, packer's HTTP port) have one copy: the defaults of
BootstrapConfig. The settings and the Dagster resource take theirs from it; the two files that cannot import
it repeat them and are held to it here: templates/common/common.pkr.hcl (packer's HTTP port range) and
remote/init-packer-remote.sh (PA_USER, PA_ROLE, PA_TOKEN, for a run of the script by hand)."""

import re

from support import REPO

from packer_assets.pve.bootstrap import BootstrapConfig
from packer_assets.config.settings import load_settings

DEFAULTS = BootstrapConfig()


def test_the_settings_default_to_bootstrap_configs_names(tmp_path):
    assert load_settings({"PACKER_ASSETS_ROOT": str(tmp_path)}).bootstrap == DEFAULTS


def test_the_resource_defaults_to_bootstrap_configs_names():
    from packer_assets.defs.resources import BOOTSTRAP_FIELDS, ProxmoxBootstrap

    fields = ProxmoxBootstrap.model_fields
    assert {name: fields[name].default for name in BOOTSTRAP_FIELDS} == {
        name: getattr(DEFAULTS, name) for name in BOOTSTRAP_FIELDS}


def test_the_packer_template_and_the_remote_script_repeat_the_same_defaults():
    hcl = (REPO / "templates/common/common.pkr.hcl").read_text()
    for name in ("http_port_min", "http_port_max"):
        block = re.search(rf'^variable "{name}" {{(.*?)^}}', hcl, re.MULTILINE | re.DOTALL)
        assert block, name
        assert re.search(r"^\s*default\s*=\s*(\d+)\s*$", block.group(1), re.MULTILINE).group(1) == str(DEFAULTS.http_port)
    script = (REPO / "packer_assets/remote/init-packer-remote.sh").read_text()
    defaults = dict(re.findall(r"^(PA_\w+)=\$\{\1:-([^}]*)\}$", script, re.MULTILINE))
    assert (defaults["PA_USER"], defaults["PA_ROLE"], defaults["PA_TOKEN"]) == (
        DEFAULTS.user, DEFAULTS.role, DEFAULTS.token_name)
