"""The web console in a real browser: Debian's chromium, driven by Playwright.

A mounted primary (``--api``) ships to a replica server (``--api``, a DR test
scenario scheduled daily); ``cdpfs console --nodes`` serves the page over both.
As an operator would: log in with a token; watch the overview's lag rise while
the replica server is paused (SIGSTOP) and fall once it goes on; restore an
older version of a file from the Browse page (confirming the dialog) and find it
back on the mount; start a DR test from the Actions page and see it on the
replica's timeline. A screenshot of each page is kept in ``$CDPFS_ARTIFACTS``
(default ``artifacts/``) under ``console/``.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    Procs,
    ReplicaServer,
    Volume,
    cdpfs,
    free_port,
    pair_stores,
    wait_replicated,
    wait_until,
)

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None,
                                reason="needs Debian's chromium (contrib/setup.sh)")
playwright = pytest.importorskip("playwright.sync_api")

ADMIN = "admin-token-for-the-console"
ARTIFACTS = Path(os.environ.get("CDPFS_ARTIFACTS",
                                Path(__file__).parent.parent / "artifacts")) / "console"


@pytest.fixture
def console(make_volume: type[Volume], tmp_path: Path
            ) -> Iterator[tuple[Volume, ReplicaServer, str]]:
    """The two nodes and the console over them: (primary, replica server, page URL)."""
    vol = make_volume("primary").init()
    replica = tmp_path / "replica.store"
    pair_stores(vol.store, replica)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"admin ops {ADMIN}\n")
    tokens.chmod(0o600)
    scenario = tmp_path / "check.toml"
    scenario.write_text('[[test]]\nrun = """test -d "$CDPFS_MOUNT" """\n')
    procs = Procs()
    server = ReplicaServer(replica, tmp_path / "serve.log", procs=procs)
    papi, rapi = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    page = f"127.0.0.1:{free_port()}"
    try:
        server.start("--api", rapi, "--api-tokens", str(tokens), "--test-every", "1d",
                     "--test-scenario", str(scenario))
        cdpfs("replica", "add", vol.store, "r1", "--address", server.address)
        vol.mount("--api", papi, "--api-tokens", str(tokens))
        (vol.mnt / "docs").mkdir()
        (vol.mnt / "docs" / "a.txt").write_text("the good version\n")
        wait_replicated(vol, replica)
        log = tmp_path / "console.log"
        procs.start(["console", "--nodes", f"http://{papi},http://{rapi}", "--listen", page],
                    log)
        wait_until(lambda: "console on" in log.read_text(), what="the console to listen")
        yield vol, server, f"http://{page}"
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
        procs.kill_all()
        vol.cleanup()


def _shot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)  # type: ignore


def test_an_operator_watches_restores_and_tests_from_the_console(
        console: tuple[Volume, ReplicaServer, str]) -> None:
    vol, server, url = console
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            page.wait_for_selector("#login:not([hidden])")
            page.fill("#token", ADMIN)
            page.click("#login-form button")
            primary = f'tr[data-node$=":{vol_port(page, 0)}"]'
            lag = page.locator(f"{primary} td.lag")
            playwright.expect(lag).to_have_attribute("data-records", "0", timeout=15_000)
            _shot(page, "overview")

            # the replica server pauses: the primary's lag rises on the page
            assert server.proc is not None
            server.proc.send_signal(signal.SIGSTOP)
            for i in range(10):
                (vol.mnt / f"f{i}").write_text(f"written while the replica is paused {i}\n")
            vol.sync()
            page.wait_for_function(
                "sel => Number(document.querySelector(sel)?.dataset.records) >= 10",
                arg=f"{primary} td.lag", timeout=20_000)
            _shot(page, "overview-lagging")
            server.proc.send_signal(signal.SIGCONT)
            playwright.expect(lag).to_have_attribute("data-records", "0", timeout=30_000)

            # a version restored from the Browse page is back on the mount
            (vol.mnt / "docs" / "a.txt").write_text("a mistake\n")
            vol.sync()
            page.click('nav a[data-tab="browse"]')
            page.fill("#browse-path", "/docs")
            page.click("#browse-form button")
            page.click('#browse-rows tr[data-name="a.txt"] a')
            # the newest version of the good content's size (17 B), before the mistake
            good = page.locator("#version-rows tr").filter(has_text="17 B").first
            playwright.expect(good).to_be_visible(timeout=10_000)
            good.locator("button.diff").click()
            playwright.expect(page.locator("#diff")).to_contain_text("+a mistake")
            _shot(page, "browse")
            page.once("dialog", lambda dialog: dialog.accept())
            good.locator("button.restore").click()
            playwright.expect(page.locator("#result")).to_contain_text("restored /docs/a.txt")
            assert (vol.mnt / "docs" / "a.txt").read_text() == "the good version\n"

            # a DR test started from the page shows on the replica's timeline
            page.select_option("#node", index=1)
            page.click('nav a[data-tab="timeline"]')
            passed = page.locator('#timeline-marks li[data-kind="drtest-passed"]')
            playwright.expect(passed).to_have_count(1, timeout=60_000)  # the scheduled one
            page.click('nav a[data-tab="actions"]')
            page.click("#drtest-start")
            playwright.expect(page.locator("#result")).to_contain_text("DR test")
            page.click('nav a[data-tab="timeline"]')

            def two_tests() -> bool:
                page.select_option("#timeline-span", "600")
                return passed.count() >= 2

            wait_until(two_tests, timeout=90, what="the second DR test on the timeline")
            assert page.locator('#timeline-chart g.mark[data-kind="drtest-passed"]').count() >= 2
            _shot(page, "timeline")
            page.click('nav a[data-tab="replicas"]')
            playwright.expect(page.locator('#replica-rows tr[data-replica="r1"]')).to_have_count(
                0, timeout=5_000)  # the replica node is selected: it has no replicas
            page.select_option("#node", index=0)
            playwright.expect(page.locator('#replica-rows tr[data-replica="r1"]')).to_have_count(
                1, timeout=5_000)
            _shot(page, "replicas")
            page.click('nav a[data-tab="cluster"]')
            playwright.expect(page.locator('#events li[data-kind="restore"]')).to_have_count(
                1, timeout=5_000)
            _shot(page, "cluster")
            assert not errors, errors  # the page's script never failed
        finally:
            browser.close()
    assert not vol.problems()


def vol_port(page: object, index: int) -> str:
    """The port of the console's node ``index`` (the rows are named by address)."""
    nodes = page.evaluate("fetch('/console/nodes').then(r => r.json())")  # type: ignore
    return nodes[index]["name"].rsplit(":", 1)[1]


def test_the_console_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    for bad in ("ftp://x:1", "http://", "10.0.0.1:8470"):
        proc = cdpfs("console", "--nodes", bad, check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    proc = cdpfs("console", "--nodes", "http://127.0.0.1:1", "--listen", "0.0.0.0:8480",
                 check=False)
    assert proc.returncode == 1 and "needs TLS" in proc.stderr
