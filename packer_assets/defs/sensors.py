"""iso_checksum_sensor: notice a new upstream ISO and rebuild the keys built from it.

Every tick polls each key's checksum source (conditional requests: an unchanged upstream costs a 304),
records an AssetObservation of iso_release with the checksums as data version, and requests the
rebuild of a changed key with run_key `<key>:<checksums>` (so one release is built once).
First sighting of a key: the observation is recorded; a run is requested only if the key was never
built, so turning the sensor on does not rebuild every template at once.
"""

import json

import dagster as dg

from packer_assets.build.plan import record_observed
from packer_assets.defs.jobs import rebuild_job
from packer_assets.defs.resources import ProjectSettings
from packer_assets.upstream.isowatch import poll

# The tag Dagster reads an observation's data version from (dagster._core.definitions.data_version).
DATA_VERSION_TAG = "dagster/data_version"
BUILT_ASSET = dg.AssetKey("template")


def iso_sources(catalog) -> dict[str, tuple[str, object]]:
    """source name -> (key, IsoSource): the boot ISO as `<key>`, extras as `<key>--<name>`."""
    sources = {}
    for entry in catalog:
        for iso in entry.all_isos():
            name = getattr(iso, "name", None)
            sources[f"{entry.key}--{name}" if name else entry.key] = (entry.key, iso)
    return sources


def key_version(key: str, cursor: dict, names: list[str]) -> str | None:
    """`sha256:<hex>` of the boot ISO, then `;<extra>=<checksum>` per extra ISO; None if one is unknown."""
    parts = []
    for name in sorted(names, key=lambda n: (n != key, n)):
        checksum = (cursor.get(name) or {}).get("checksum")
        if checksum is None:
            return None
        parts.append(checksum if name == key else f"{name.split('--', 1)[1]}={checksum}")
    return ";".join(parts)


def build_iso_checksum_sensor(interval_seconds: int) -> dg.SensorDefinition:
    """The sensor, ticking every `interval_seconds` (settings: PACKER_ASSETS_SENSOR_INTERVAL)."""

    @dg.sensor(
        job=rebuild_job,
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Polls every key's ISO checksum file; a changed checksum rebuilds that key.",
    )
    def iso_checksum_sensor(context: dg.SensorEvaluationContext, project: ProjectSettings) -> dg.SensorResult:
        sources = iso_sources(project.catalog())
        result = poll({name: iso for name, (_key, iso) in sources.items()}, json.loads(context.cursor or "{}"))
        # the checksums as last observed, for the schedule's pre-check (plan.py)
        record_observed(
            project.layout(),
            {name: entry["checksum"] for name, entry in result.cursor.items() if entry.get("checksum")},
        )
        for name, message in result.errors.items():
            context.log.warning(f"{name}: {message} (keeps its last known checksum)")
        by_key: dict[str, list[str]] = {}
        for name, (key, _iso) in sources.items():
            by_key.setdefault(key, []).append(name)
        built = context.instance.get_materialized_partitions(BUILT_ASSET)
        observations, requests = [], []
        for key, names in by_key.items():
            version = key_version(key, result.cursor, names)
            changed = any(n in result.changed for n in names)
            first = any(n in result.first_seen for n in names)
            if version is None or not (changed or first):
                continue
            observations.append(
                dg.AssetObservation(asset_key="iso_release", partition=key, tags={DATA_VERSION_TAG: version})
            )
            if changed or key not in built:
                requests.append(
                    dg.RunRequest(
                        partition_key=key,
                        run_key=f"{key}:{version}",
                        tags={"packer-assets/trigger": "iso-change" if changed else "first-sight"},
                    )
                )
        found = f"{len(sources)} ISO source(s) polled: {result.summary()}"
        context.log.info(f"{found}; {len(requests)} rebuild(s) requested")
        skip = None
        if not requests:  # the tick's line in the UI says what happened, not "returned an empty result"
            skip = f"{found}; " + (
                "every key seen for the first time was built before: nothing to rebuild"
                if result.first_seen
                else "nothing to rebuild"
            )
        return dg.SensorResult(
            run_requests=requests, asset_events=observations, cursor=json.dumps(result.cursor), skip_reason=skip
        )

    return iso_checksum_sensor
