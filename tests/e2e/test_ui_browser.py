"""The Dagster UI in headless Chromium (Debian's chromium + chromium-driver), against the lab.

`dagster dev` (webserver + daemon) on the repo's dagster.yaml; the browser finds every asset of the
definitions in the expanded asset graph, then materializes one partition of unattended_files through
the launch dialog, and the run must succeed. Screenshots (kept by CI) go to test-output/ui-*.png.
"""

import shutil
import time
from pathlib import Path

import dagster as dg
import pytest
import requests
from support.dagster_procs import BIN, REPO, Proc, dagster_env, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.lab]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
OUTPUT = REPO / "test-output"
KEY = "debian-12"
ASSET = "unattended_files"


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for binary in (CHROMIUM, CHROMEDRIVER):
        if not Path(binary).exists():
            pytest.fail(f"{binary} is missing: apt-get install chromium chromium-driver (make test installs it)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1600,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def webserver(lab_project, tmp_path):
    """`dagster dev` on the repo's dagster.yaml in a fresh DAGSTER_HOME, pointed at the lab."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    dev = Proc.start("dagster-dev", [str(BIN / "dagster"), "dev", "-m", "packer_assets.definitions",
                                     "-h", "127.0.0.1", "-p", str(port)], dagster_env(home), tmp_path / "logs")
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return requests.get(f"{url}/server_info", timeout=2).ok
        except requests.RequestException:
            return not dev.alive()

    try:
        wait_for(up, 90, "dagster dev to serve", interval=0.5, on_timeout=dev.tail)
        assert dev.alive(), dev.tail()
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield url, instance, dev
    finally:
        dev.stop()


def wait_element(driver, xpath: str, timeout: float = 60, what: str | None = None, click: bool = False):
    """The first displayed element at xpath (clicked if asked), retrying while the page re-renders."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        ElementNotInteractableException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.common.by import By

    def find():
        try:
            found = [e for e in driver.find_elements(By.XPATH, xpath) if e.is_displayed()]
            if found and click:
                found[0].click()
            return found[0] if found else None
        except (StaleElementReferenceException, ElementClickInterceptedException, ElementNotInteractableException):
            return None

    return wait_for(find, timeout, what or xpath, interval=0.25)


def exact_text(text: str) -> str:
    return f"//*[normalize-space(text())='{text}']"


@pytest.mark.timeout(810)  # its own waits add up to 754 s
def test_ui_shows_every_asset_and_materializes_one_partition(webserver, browser):
    try:
        ui_shows_every_asset_and_materializes_one_partition(webserver, browser)
    except BaseException:
        OUTPUT.mkdir(exist_ok=True)
        browser.save_screenshot(str(OUTPUT / "ui-failure.png"))  # what the browser showed when it failed
        raise


def ui_shows_every_asset_and_materializes_one_partition(webserver, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from packer_assets import definitions

    url, instance, dev = webserver
    OUTPUT.mkdir(exist_ok=True)
    asset_keys = sorted(k.to_user_string() for k in definitions.defs.resolve_asset_graph().get_all_asset_keys())

    # The asset graph, every group expanded: every asset of the definitions is a node.
    browser.get(f"{url}/asset-groups")
    # the graph's own settings menu (after its zoom controls; the navigation has a Settings too)
    wait_element(browser, "//*[@aria-label='zoom_in']/following::*[@aria-label='settings'][1]",
                 what="the asset graph", click=True)
    wait_element(browser, "//*[@role='menuitem'][starts-with(normalize-space(.), 'Expand all groups')]", click=True)
    for key in asset_keys:
        wait_element(browser, exact_text(key), 30, f"asset {key} in the graph")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # close the settings menu
    time.sleep(0.5)  # let the layout settle for the picture
    browser.save_screenshot(str(OUTPUT / "ui-asset-graph.png"))

    # Materialize one partition: the asset page, Materialize..., pick the key, launch.
    browser.get(f"{url}/assets/{ASSET}")
    wait_element(browser, "//button[starts-with(normalize-space(.), 'Materialize')]",
                 what="the Materialize button", click=True)
    wait_element(browser, f"//*[contains(normalize-space(.), 'Launch runs to materialize {ASSET}')]",
                 what="the launch dialog")
    wait_element(browser, "//*[normalize-space(text())='Select a partition or create one']", click=True)
    wait_element(browser, f"//label[.//*[normalize-space(text())='{KEY}']]", what=f"partition {KEY}", click=True)
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # close the list, keep the dialog
    wait_element(browser, "//button[normalize-space(.)='Launch 1 run']", what="'Launch 1 run'", click=True)

    def run_done():
        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": KEY}))
        return runs and runs[0].status in {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
                                           dg.DagsterRunStatus.CANCELED} and runs[0]

    run = wait_for(run_done, 150, f"the UI-launched run of {ASSET}[{KEY}]", interval=0.5, on_timeout=dev.tail)
    assert run.status == dg.DagsterRunStatus.SUCCESS, dev.tail()
    assert run.asset_selection == {dg.AssetKey(ASSET)}
    done = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(ASSET),
                                                                 asset_partitions=[KEY]), limit=1).records
    assert done and done[0].run_id == run.run_id

    # The run page says so too; that is the picture CI keeps.
    browser.get(f"{url}/runs/{run.run_id}")
    wait_element(browser, "//*[normalize-space(text())='Success']", 60, "the run page's Success status")
    time.sleep(1)
    browser.save_screenshot(str(OUTPUT / "ui-materialize-success.png"))
    assert (OUTPUT / "ui-materialize-success.png").stat().st_size > 10_000


def test_the_registry_view_names_each_key_s_template_and_a_failed_smoke_test_shows_against_its_key(
        webserver, browser, lab_project):
    try:
        registry_view_and_failed_smoke_test(webserver, browser, lab_project)
    except BaseException:
        OUTPUT.mkdir(exist_ok=True)
        browser.save_screenshot(str(OUTPUT / "ui-registry-failure.png"))
        raise


def registry_view_and_failed_smoke_test(webserver, browser, lab_project):
    """Two keys built into the UI's instance (debian-12 and windows-2022 pass; ubuntu-2204's clone never
    finishes cloud-init, a lab fault), the registry materialized: its table in the UI names each built key's
    VMID and says `none` for the others, and ubuntu-2204's failed smoke test is shown against ubuntu-2204."""
    import json

    from selenium.webdriver.common.by import By
    from support.builds import rebuild, resources

    from packer_assets.defs.registry import template_registry

    url, instance, _dev = webserver
    for key in ("debian-12", "windows-2022"):
        assert rebuild(lab_project, instance, key=key).success, key
    lab_project.pve.lab_faults["ubuntu-2204"] = {"cloud_init"}
    assert not rebuild(lab_project, instance, key="ubuntu-2204").success
    assert dg.materialize([template_registry], instance=instance,
                          resources={"project": resources(lab_project)["project"]}).success
    registry = json.loads(lab_project.layout.registry_file.read_text())["templates"]
    built = {key: found["current"]["vmid"] for key, found in registry.items() if found["current"]}
    assert set(built) == {"debian-12", "windows-2022"}

    # The registry view: the template_registry asset's table, a row per key.
    browser.get(f"{url}/assets/template_registry")
    wait_element(browser, exact_text("templates"), 60, "the registry's templates table")
    unfold = "//tr[.//*[normalize-space(text())='templates']]//*[normalize-space(text())='[Show Markdown]']"
    if browser.find_elements(By.XPATH, unfold):  # the UI folds a long table behind a link
        wait_element(browser, unfold, 10, "the link to the table", click=True)
    for key, vmid in built.items():
        wait_element(browser, f"//td[normalize-space(text())='{key}']/following-sibling::td[1][normalize-space(text())"
                              f"='{vmid}']", 60, f"{key}'s VMID {vmid} in the registry table")
    wait_element(browser, "//td[normalize-space(text())='ubuntu-2204']/following-sibling::td[2]"
                          "[normalize-space(text())='none']", 30, "ubuntu-2204 without a current template")
    browser.save_screenshot(str(OUTPUT / "ui-registry.png"))

    # The smoke test's evaluation of ubuntu-2204, with its partition, on template's checks.
    browser.get(f"{url}/assets/template?view=checks")
    wait_element(browser, exact_text("smoke_test"), 60, "the smoke_test check", click=True)
    wait_element(browser, "//*[starts-with(normalize-space(text()), \"ubuntu-2204: smoke test of template\") and "
                          "contains(normalize-space(text()), \"failed at step 'cloud_init'\")]", 60,
                 "ubuntu-2204's failed smoke test")
    wait_element(browser, "//*[normalize-space(text())='Partition']/following::*[normalize-space(text())="
                          "'ubuntu-2204'][1]", 30, "the evaluation's partition")
    wait_element(browser, exact_text("Failed"), 30, "the Failed result")
    browser.save_screenshot(str(OUTPUT / "ui-smoke-test-failed.png"))
