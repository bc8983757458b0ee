"""The portal in a real browser, end to end: sign in, make a key, pull with it, and so on.

Screenshots of each page, at a desktop's and a phone's width, are saved in
``test-artifacts/portal-screenshots`` (``$DOCKMIRROR_SCREENSHOTS`` to choose
another directory), which the run names.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from .browser import (
    DESKTOP,
    PHONE,
    browser,  # noqa: F401 - fixture
    csp_violations,
    fits_width,
    screenshot,
    screenshots,  # noqa: F401 - fixture
    wait_for,
)
from .conftest import Dockmirror, DockmirrorFactory, Seeder
from .images import SkopeoError, pull
from .portal_support import IdentityProvider, idp, portal_mirror  # noqa: F401 - fixture
from .registries import Registry, wait_until


def sign_in(driver: WebDriver, mirror: Dockmirror, login: str) -> None:
    driver.get(f"{mirror.url}/portal/")
    driver.find_element(By.LINK_TEXT, "Sign in with GitHub").click()
    wait_for(driver, "#login")
    driver.find_element(By.ID, "login").send_keys(login)
    driver.find_element(By.ID, "authorize").click()
    wait_for(driver, "main h1", "My API keys")


def key_row(driver: WebDriver, app_id: str) -> dict[str, str]:
    """The cells of a key's row in the keys table, by column label."""
    cells = driver.find_elements(By.CSS_SELECTOR, f"tr[id='{app_id}'] td[data-label]")
    return {c.get_attribute("data-label") or "": c.text for c in cells}


def create_key(driver: WebDriver, name: str, repositories: str = "") -> tuple[str, str]:
    driver.find_element(By.ID, "name").send_keys(name)
    if repositories:
        driver.find_element(By.ID, "repositories").send_keys(repositories)
    driver.find_element(By.CSS_SELECTOR, "form.create button[type=submit]").click()
    wait_for(driver, "#api-key")
    return read_new_key(driver)


def read_new_key(driver: WebDriver) -> tuple[str, str]:
    app_id = driver.find_element(By.ID, "app-id").text
    api_key = driver.find_element(By.ID, "api-key").text
    assert re.fullmatch(r"app_[a-z0-9]{20}", app_id) and api_key.startswith("sk_")
    return app_id, api_key


def test_portal_end_to_end_in_a_browser(
    browser: WebDriver,  # noqa: F811
    screenshots: Path,  # noqa: F811
    plain_registry: Registry,
    seeded: Seeder,
    dockmirror: DockmirrorFactory,
    idp: IdentityProvider,  # noqa: F811
    unique_repo: str,
    tmp_path: Path,
) -> None:
    driver = browser
    image = seeded(plain_registry, unique_repo, layers=(300_000, 2000))
    mirror = portal_mirror(dockmirror, plain_registry, idp, admins=["github:root"])
    reference = f"{mirror.host}/{unique_repo}:latest"
    shots: dict[str, str] = {}

    def shoot(name: str) -> None:
        """The current page at both widths; it must fit a phone's width."""
        shots[name] = driver.current_url
        screenshot(driver, screenshots, name, DESKTOP[0])
        screenshot(driver, screenshots, f"{name}-phone", PHONE[0])
        driver.set_window_size(*PHONE)
        assert fits_width(driver), f"{name} is wider than a phone"
        driver.set_window_size(*DESKTOP)

    # 1. Signed out: one button per provider.
    driver.get(f"{mirror.url}/portal/")
    assert {b.text for b in driver.find_elements(By.CSS_SELECTOR, ".stack a")} == {
        "Sign in with GitHub",
        "Sign in with Company SSO",
    }
    shoot("signed-out")

    # 2. Sign in, 3. create a key and read it from the page.
    sign_in(driver, mirror, "alice")
    assert "no keys yet" in driver.find_element(By.CSS_SELECTOR, ".empty").text
    app_id, api_key = create_key(driver, "laptop")
    copy = driver.find_element(By.CSS_SELECTOR, "button[data-copy='api-key']")
    assert copy.is_displayed()  # the script ran under the CSP
    snippets = driver.find_element(By.ID, "snippet-docker").text
    assert f"--username {app_id}" in snippets and mirror.host in snippets
    shoot("new-key")

    # 4. Pull with it; 5. reload: use count and bytes go up.
    pull(reference, tmp_path / "first", (app_id, api_key))
    driver.get(f"{mirror.url}/portal/")
    before = key_row(driver, app_id)
    assert before["Requests"] == "0" and before["Last used"] == "never"

    def counted() -> bool:
        driver.refresh()
        try:
            row = key_row(driver, app_id)
        except StaleElementReferenceException:
            return False
        return row.get("Requests", "0") != "0" and row.get("Traffic") != "0 B"

    wait_until(counted, timeout=15, interval=1)  # usage is written every 5 s
    row = key_row(driver, app_id)
    assert int(row["Requests"].replace(",", "")) >= 4
    assert float(row["Traffic"].split()[0]) > 0 and row["Last used"] != "never"
    total = sum(b.size for b in image.blobs)
    assert "kB" in row["Traffic"] or "MB" in row["Traffic"], (row, total)
    bars = driver.find_elements(By.CSS_SELECTOR, "svg.chart rect.bar:not(.empty)")
    assert len(bars) == 1  # today's bar
    shoot("keys")

    # 6. Regenerate: the old key is refused, the new one works.
    driver.find_element(By.CSS_SELECTOR, f"a[href='/portal/keys/{app_id}/rotate']").click()
    wait_for(driver, "form button", "Regenerate key")
    driver.find_element(By.XPATH, "//button[text()='Regenerate key']").click()
    wait_for(driver, "#api-key")
    new_id, new_key = read_new_key(driver)
    assert new_id != app_id and app_id in driver.page_source  # "the old key ... no longer works"
    with pytest.raises(SkopeoError):
        pull(reference, tmp_path / "old", (app_id, api_key))
    pull(reference, tmp_path / "new", (new_id, new_key))

    # 7. Delete, after a confirmation page.
    driver.get(f"{mirror.url}/portal/")
    driver.find_element(By.CSS_SELECTOR, f"a[href='/portal/keys/{new_id}/delete']").click()
    wait_for(driver, "main h1", "Delete “laptop”?")
    shoot("confirm-delete")
    driver.find_element(By.XPATH, "//button[text()='Delete key']").click()
    wait_for(driver, ".flash")
    assert "deleted" in driver.find_element(By.CSS_SELECTOR, ".flash").text
    assert not driver.find_elements(By.CSS_SELECTOR, f"table.keys tbody tr[id='{new_id}'] a")
    with pytest.raises(SkopeoError):
        pull(reference, tmp_path / "deleted", (new_id, new_key))

    # 8. Sign out.
    driver.find_element(By.XPATH, "//button[text()='Sign out']").click()
    wait_for(driver, ".stack")
    driver.get(f"{mirror.url}/portal/api/keys")
    assert '"sign in first"' in driver.page_source

    # The operator view, for an admin.
    sign_in(driver, mirror, "root")
    create_key(driver, "ci-runner", "hub/library, hub/test")
    driver.get(f"{mirror.url}/portal/admin")
    text = driver.find_element(By.TAG_NAME, "main").text
    assert "Operator view" in text and "github:alice" in text and "github:root" in text
    assert "hub" in text and "up" in text  # the upstream answers
    assert driver.find_elements(By.CSS_SELECTOR, "svg.chart")
    shoot("operator")
    driver.get(f"{mirror.url}/portal/")
    shoot("keys-admin")
    assert csp_violations(driver) == []
    assert {p.name for p in screenshots.glob("*.png")} >= {
        f"{name}{suffix}.png" for name in shots for suffix in ("", "-phone")
    }
