"""template_registry: registry.json, every key's current template, channels and revocations, as an asset.

The core (packer_assets/evidence/registry.py) rewrites the file after every build, proof, channel change and
revocation; this asset rewrites it on demand (the `registry` job) and shows it in the UI.
"""

import dagster as dg

from packer_assets.defs.assets import OWNERS, template_proof
from packer_assets.defs.resources import ProjectSettings
from packer_assets.evidence.registry import content_digest, registry_table, write_registry


@dg.asset(
    deps=[template_proof],
    group_name="templates",
    kinds={"json"},
    owners=OWNERS,
    description="docs/proof/platform/packer-builds/registry.json (schema docs/schema/registry.schema.json): per "
    "catalog key the promoted template, its channels and the retained and revoked ones, read from the node's tags "
    "and descriptions and the build records. What Terraform reads to clone the current template of a key.",
)
def template_registry(context: dg.AssetExecutionContext, project: ProjectSettings) -> dg.MaterializeResult:
    layout = project.layout()
    registry = write_registry(layout, project.build_access().connect(), project.catalog())
    current = [key for key, found in registry.templates.items() if found.current]
    context.log.info(
        f"registry {layout.registry_file}: {len(current)} of {len(registry.templates)} keys have a current template"
    )
    return dg.MaterializeResult(
        metadata={
            "registry": dg.MetadataValue.path(str(layout.registry_file)),
            "templates": dg.MetadataValue.md(registry_table(registry)),
            "registry_json": dg.MetadataValue.json(registry.model_dump(mode="json")),
            "updated_at": registry.updated_at.isoformat(),
            "keys_with_current": len(current),
        },
        # the content, not updated_at: an unchanged registry stays fresh downstream
        data_version=dg.DataVersion(content_digest(registry)),
    )


registry_job = dg.define_asset_job(
    "registry",
    selection=dg.AssetSelection.assets(template_registry),
    description="Rewrite registry.json from the node and the build records (after a change made outside "
    "packer-assets, or to see it in the UI).",
)
