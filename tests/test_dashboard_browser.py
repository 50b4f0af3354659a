"""The dashboard in a real browser: headless Chromium (Debian's, driven by Selenium
through Debian's chromedriver) on a live cluster of three node processes.

It loads ``/ui`` from one node, sees all three nodes with their charts filled
by the load put through them, SIGKILLs one node and sees the page mark it
DOWN. Nothing is downloaded at run time: Selenium is given the driver's path,
so its manager never fetches one; the browser runs with networking features
off. A screenshot is saved under the test's tmp_path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringkv.tools.launcher import free_port_block
from ringkv.tools.local_cluster import LocalCluster, node_view
from tests.procs import http, wait_until

pytestmark = pytest.mark.cluster

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Half-second gossip rounds: the cluster forms, and notices the kill, sooner (as
# tests/test_bootstrap_process.py runs it).
GOSSIP = {"timing.gossip_interval_ms": 500}
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1400,1500")


def ensure_browser() -> None:
    """Chromium and its driver, from Debian's packages when missing (as root with
    apt-get); skip with the reason when they cannot be had."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium and chromium-driver are not installed (and this is not root "
                    "with apt-get to install them)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for command in (["apt-get", "update", "-qq"],
                        ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
            subprocess.run(command, check=True, env=env, timeout=600, capture_output=True)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"could not install chromium and chromium-driver: {exc}")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("apt-get ran but chromium or chromedriver is still missing")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    ensure_browser()
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(20)
        yield driver
    finally:
        driver.quit()  # ends the browser and the driver processes it started


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path / "cluster", nodes=3, rf=3,
                           base_client_port=free_port_block(3),
                           base_internode_port=free_port_block(3), config_overrides=GOSSIP)
    try:
        cluster.up(timeout_s=30, together=True)
        yield cluster
    finally:
        cluster.down()


def put_load(cluster: LocalCluster) -> None:
    """Writes and reads through every node at several levels, and a few transactions."""
    for i, proc in enumerate(cluster.procs * 8):
        for level in ("ONE", "QUORUM", "ALL"):
            status, body = http("PUT", f"{proc.url}/v1/kv/default/k{i}?consistency={level}",
                                {"value": i})
            assert status == 200, body
            assert http("GET", f"{proc.url}/v1/kv/default/k{i}?consistency={level}")[0] == 200

    def transaction_commits() -> bool:
        return http("PUT", f"{cluster.procs[0].url}/v1/kv/txn/counter", {"value": 1})[0] == 200

    wait_until(transaction_commits, timeout_s=15, interval_s=0.2,
               what="a transaction to commit (the groups elect leaders first)")


# The page redraws every poll, so what it shows is read in one script run: an element
# found in one call could be gone (stale) by the next.
READ_PAGE = """
const attr = (sel, name) => [...document.querySelectorAll(sel)].map((e) => e.getAttribute(name));
return {
  rows: [...document.querySelectorAll("#nodes tbody tr")].map((r) => [r.dataset.node,
         {liveness: r.dataset.liveness, reachable: r.dataset.reachable}]),
  charts: [...document.querySelectorAll("#charts .node-charts")].map((card) => {
    const chart = card.querySelector("svg.chart");  // the first: ops/s
    return [card.dataset.node, chart ? [Number(chart.getAttribute("data-points")),
                                        Number(chart.getAttribute("data-max"))] : null];
  }),
  ring_nodes: attr("#ring path", "data-node"),
  groups: attr("#groups tbody tr", "data-group"),
  errors: document.getElementById("errors").textContent,
};
"""


def read_page(driver: Any) -> dict[str, Any]:
    page: dict[str, Any] = driver.execute_script(READ_PAGE)
    page["rows"] = dict(page["rows"])
    page["charts"] = {node: tuple(chart) for node, chart in page["charts"] if chart}
    return page


def rows(driver: Any) -> dict[str, dict[str, str]]:
    return read_page(driver)["rows"]


def chart_points(driver: Any) -> dict[str, tuple[int, float]]:
    """Node id -> (points drawn, largest value) of its ops/s chart."""
    return read_page(driver)["charts"]


def test_the_dashboard_shows_every_node_their_load_and_a_killed_node_down(
        cluster: LocalCluster, browser: Any, tmp_path: Path) -> None:
    started = time.monotonic()
    put_load(cluster)
    first, victim = cluster.procs[0], cluster.procs[2]
    ids = {proc.node_id for proc in cluster.procs}
    browser.get(f"{first.url}/ui")
    assert "ringkv dashboard" in browser.title

    def all_shown_with_load() -> bool:
        shown = rows(browser)
        charts = chart_points(browser)
        return (set(shown) == ids
                and all(row == {"liveness": "UP", "reachable": "true"} for row in shown.values())
                and set(charts) == ids
                # Each node's chart has points, and traffic (every node coordinated some).
                and all(points >= 2 and top > 0 for points, top in charts.values()))

    wait_until(all_shown_with_load, timeout_s=15, interval_s=0.2,
               what=f"the page to show every node with load: {rows(browser)} "
                    f"{chart_points(browser)}")
    page = read_page(browser)
    assert set(page["ring_nodes"]) == ids  # every node's arcs on the ring
    assert page["groups"], "the transactional tier's groups are shown"
    assert page["errors"] == ""
    browser.save_screenshot(str(tmp_path / "dashboard.png"))

    victim.kill()
    # Unreachable at once (the serving node cannot ask it); DOWN once gossip says so.
    wait_until(lambda: rows(browser).get(victim.node_id, {}).get("liveness") == "DOWN",
               timeout_s=30, interval_s=0.2, what=f"the page to show {victim.node_id} DOWN")
    assert rows(browser)[victim.node_id]["reachable"] == "false"
    assert node_view(first)[victim.node_id]["liveness"] == "DOWN"  # as the node itself says
    survivors = {n: r for n, r in rows(browser).items() if n != victim.node_id}
    assert all(r["liveness"] == "UP" for r in survivors.values()), survivors
    browser.save_screenshot(str(tmp_path / "dashboard-node-down.png"))
    print(f"browser test body took {time.monotonic() - started:.1f} s")
