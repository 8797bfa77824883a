"""The web page of `shitu serve` in headless Chromium, on a server whose every read needs the
API key (--protect-reads): enter the key, recognise a photo, add an image to a label, rename
the label, delete an image; then the page on a phone screen, errors beside their form (a busy
or unreachable server too), uploads split within the server's limits, dropped files, stale
answers, edits in progress, captions, WebP photos' EXIF orientation, focus and accessible
names. The tests share the server and run in file order. Needs Debian's `chromium` and
`chromium-driver`; the screenshot lands in the test's tmp dir and in test-artifacts/ at the
repository root."""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import (
    ElementNotInteractableException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from shitu.index import Gallery
from shitu.inference.preprocess import decode_rgb
from shitu.serving.settings import DEFAULT_MAX_REQUESTS
from tests.conftest import REPO_ROOT
from tests.index_helpers import make_images
from tests.serving_helpers import PrefixProxy, ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = REPO_ROOT / "test-artifacts"
KEY = "browser-key"
WAIT_S = 60


@pytest.fixture(scope="module")
def server(serving_library, tmp_path_factory):
    process = ServerProcess(
        serving_library,
        tmp_path_factory.mktemp("browser-server"),
        "--api-key",
        KEY,
        "--protect-reads",
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.fail(
            f"headless Chromium is needed for this test ({', '.join(missing)} missing): "
            "apt-get install -y chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1400,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait(driver: WebDriver, condition, message: str):
    return WebDriverWait(driver, WAIT_S).until(condition, message)


def texts(driver: WebDriver, selector: str) -> list[str]:
    """The shown text of the elements `selector` finds, read in one step: the page may draw
    a list again between finding its elements and reading them (a stale element)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.innerText.trim())",
        selector,
    )


def label_button(driver: WebDriver, label: str):
    return driver.find_element(By.CSS_SELECTOR, f'#labels button[data-label="{label}"]')


def loaded_thumbnails(driver: WebDriver) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll('#thumbs img')]"
        ".filter(img => img.complete && img.naturalWidth > 0).length"
    )


def test_protect_reads_guards_everything_but_health_page_and_docs(serving_library, server):
    image = serving_library.queries()[0][0]
    upload = {"files": {"image": (image.name, image.read_bytes(), "image/jpeg")}}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for method, path, body in [
            ("POST", "/v1/recognize", upload),
            ("POST", "/v1/extract", upload),
            ("GET", "/v1/gallery", {}),
            ("GET", "/v1/gallery/labels", {}),
            ("GET", "/v1/gallery/labels/Lemon Soda", {}),
            ("GET", "/v1/gallery/images/1", {}),
            ("GET", "/v1/gallery/images/1/thumbnail", {}),
            ("GET", "/metrics", {}),
        ]:
            refused = client.request(method, path, **body)
            assert refused.status_code == 401, path
            assert "this server needs the API key" in refused.json()["detail"]
            allowed = client.request(method, path, headers={"X-API-Key": KEY}, **body)
            assert allowed.status_code == 200, (path, allowed.text)
        for path in ("/healthz", "/", "/docs", "/openapi.json", "/static/app.js"):
            assert client.get(path).status_code == 200, path


def test_the_redoc_page_fetches_nothing_from_elsewhere(server, browser):
    """ReDoc's menu shows a logo from cdn.redoc.ly: the browser fetched it, from an offline
    server's docs too. Its page's policy now stops the request before it leaves."""
    browser.get_log("performance")
    browser.get(f"{server.url}/redoc")
    wait(browser, lambda d: "API docs by Redocly" in d.find_element(By.TAG_NAME, "body").text,
         "ReDoc shown")  # fmt: skip
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "h1"), "the API's title shown")
    events = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
    outside = {
        event["params"]["requestId"]: event["params"]["request"]["url"]
        for event in events
        if event["method"] == "Network.requestWillBeSent"
        and event["params"].get("documentURL", "").startswith(server.url)  # not the browser's
        and not event["params"]["request"]["url"].startswith((server.url, "blob:", "data:"))
    }
    blocked = {
        event["params"]["requestId"]
        for event in events
        if event["method"] == "Network.loadingFailed" and event["params"].get("blockedReason")
    }
    assert set(outside) <= blocked, outside


def test_the_page_works_behind_a_proxy_that_serves_it_under_a_prefix(
    serving_library, server, browser
):
    """Through a proxy that serves the server at /shitu/, even one the server was not told
    of (no --root-path): the page's requests, thumbnails' too, stay under the prefix."""
    proxy = PrefixProxy(server.url, "/shitu")
    try:
        browser.get_log("performance")
        browser.get(proxy.url)
        browser.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)
        summary = browser.find_element(By.ID, "gallery-summary")
        wait(browser, lambda d: " label" in summary.text, "the gallery loaded")
        shelf, products = serving_library.demo.shelves[0]
        browser.find_element(By.ID, "photo").send_keys(str(shelf))
        wait(browser, lambda d: len(texts(d, "#results li")) == len(products), "results shown")
        assert sorted(texts(browser, "#results li button")) == sorted(products)
        first = browser.find_element(By.CSS_SELECTOR, "#labels button").get_attribute("data-label")
        choose_label(browser, first)
        wait(browser, lambda d: loaded_thumbnails(d) > 0, "thumbnails shown")
        requested = [
            json.loads(entry["message"])["message"]["params"]["request"]["url"]
            for entry in browser.get_log("performance")
            if '"Network.requestWillBeSent"' in entry["message"]
            and proxy.url in entry["message"]  # the page's, not the browser's own
        ]
        outside = [url for url in requested if not url.startswith((proxy.url, "blob:", "data:"))]
        assert requested and not outside, outside
    finally:
        proxy.stop()


def test_recognise_and_edit_the_gallery_in_the_page(serving_library, server, browser, tmp_path):
    browser.get_log("performance")  # drop what the browser loaded for itself at start
    browser.get(f"{server.url}/")
    message = browser.find_element(By.ID, "message")
    wait(browser, lambda d: "needs the API key" in message.text, "the page asks for the key")
    browser.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)
    wait(browser, lambda d: len(texts(d, "#labels button")) == 8, "gallery labels listed")
    assert not message.is_displayed()
    assert "24 images, 8 labels" in browser.find_element(By.ID, "gallery-summary").text
    assert not cut_placeholders(browser)
    browser.get_log("browser")  # drop the 401s logged before the key was entered

    # Recognise a shelf photo: one box and one list entry per product.
    shelf, products = serving_library.demo.shelves[0]
    browser.find_element(By.ID, "photo").send_keys(str(shelf))
    wait(browser, lambda d: len(texts(d, "#results li")) == len(products), "results shown")
    shown = texts(browser, "#results li button")
    assert sorted(shown) == sorted(products)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#overlay rect.box")) == len(products)
    assert browser.execute_script("return document.getElementById('photo-view').naturalWidth") > 0
    lines = "return document.querySelector('.drop-hint').getClientRects().length"
    assert browser.execute_script(lines) == 1  # "or drop one here", not split after the file

    # A format the server reads but the browser cannot show (TIFF): results, without boxes.
    tiff = tmp_path / "shelf.tif"
    with Image.open(shelf) as photo:
        photo.save(tiff)
    browser.find_element(By.ID, "photo").send_keys(str(tiff))
    status = browser.find_element(By.ID, "recognise-status")
    wait(browser, lambda d: "cannot display" in status.text, "results without the photo")
    assert sorted(texts(browser, "#results li button")) == sorted(products)
    assert not browser.find_elements(By.CSS_SELECTOR, "#overlay rect.box")
    assert not browser.find_element(By.ID, "photo-view").is_displayed()

    # Add a new photo to an existing label.
    query = next(path for path, label in serving_library.queries() if label == "Lemon Soda")
    label_input = browser.find_element(By.ID, "add-label")
    label_input.clear()
    label_input.send_keys("Lemon Soda")
    browser.find_element(By.ID, "add-files").send_keys(str(query))
    browser.find_element(By.CSS_SELECTOR, "#add-form button[type=submit]").click()
    wait(browser, lambda d: "added 1" in d.find_element(By.ID, "add-status").text, "image added")
    wait(browser, lambda d: loaded_thumbnails(d) == 4, "four thumbnails of Lemon Soda shown")
    assert browser.find_element(By.ID, "label-title").text == "Lemon Soda (4 images)"
    assert label_button(browser, "Lemon Soda").text.endswith("4")
    screenshot = tmp_path / "serving-page.png"
    assert browser.save_screenshot(str(screenshot))
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / screenshot.name)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}) as client:
        listed = client.get("/v1/gallery/labels/Lemon Soda").json()
    assert listed["count"] == 4 and listed["images"][-1]["name"].endswith(".jpg")

    # Rename the label, then delete the image just added.
    rename = browser.find_element(By.ID, "rename-input")
    rename.clear()
    rename.send_keys("Lemon Soda Zero", Keys.ENTER)
    wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, '#labels button[data-label="Lemon Soda Zero"]'),
        "renamed",
    )
    assert "Lemon Soda" not in [
        b.get_attribute("data-label")
        for b in browser.find_elements(By.CSS_SELECTOR, "#labels button")
    ]
    new_id = listed["images"][-1]["id"]
    browser.find_element(By.CSS_SELECTOR, f'figure.thumb[data-id="{new_id}"] button').click()
    browser.switch_to.alert.accept()
    wait(
        browser,
        lambda d: d.find_element(By.ID, "label-title").text == "Lemon Soda Zero (3 images)",
        "image deleted",
    )
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}) as client:
        assert client.get("/v1/gallery/labels/Lemon Soda Zero").json()["count"] == 3

    # Nothing the page loaded came from anywhere but this server, and it logged no errors.
    # Requests are matched to their document, so the browser's own pages (its new-tab page
    # loads chrome: and chrome-untrusted: resources whenever it likes) do not count.
    sent = [
        json.loads(entry["message"])["message"]["params"]
        for entry in browser.get_log("performance")
        if '"Network.requestWillBeSent"' in entry["message"]
    ]
    requested = [
        params["request"]["url"]
        for params in sent
        if params.get("documentURL", "").startswith(server.url)
    ]
    outside = [url for url in requested if not url.startswith((server.url, "blob:", "data:"))]
    assert requested and not outside, outside
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


# The page's fetch, wrapped to count the thumbnails it asks for (window.thumbnailFetches).
COUNT_THUMBNAIL_FETCHES = """
window.thumbnailFetches = 0;
const realFetch = window.fetch;
window.fetch = (url, options) => {
  if (String(url).includes("/thumbnail")) window.thumbnailFetches++;
  return realFetch(url, options);
};
"""


def test_a_label_with_more_images_than_a_page(server, browser, tmp_path):
    """The first 200 images, then a button for the rest, every one of them also where
    another client removed an image meanwhile; thumbnails are fetched as they come near the
    screen."""
    images = make_images(tmp_path / "many", 205, seed=5)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=120) as client:
        for start in range(0, len(images), 32):
            files = [
                ("image", (p.name, p.read_bytes(), "image/png")) for p in images[start : start + 32]
            ]
            added = client.post("/v1/gallery/images", data={"label": "Many"}, files=files)
            assert added.status_code == 201, added.text
    browser.get(f"{server.url}/")
    key = browser.find_element(By.ID, "api-key")
    key.clear()  # the earlier test left it in the session
    key.send_keys(KEY, Keys.TAB)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#labels button[data-label="Many"]'),
         "the new label listed")  # fmt: skip
    browser.execute_script(COUNT_THUMBNAIL_FETCHES)
    # Found and clicked in one step: the list may be drawn again (two loads at start).
    browser.execute_script(
        """document.querySelector('#labels button[data-label="Many"]').click()"""
    )
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "figure.thumb")) == 200, "page 1")
    # Thumbnails are fetched as they near the screen, not 200 at once.
    wait(browser, lambda d: loaded_thumbnails(d) > 0, "the first thumbnails shown")
    assert 0 < browser.execute_script("return window.thumbnailFetches") < 200
    last = browser.find_elements(By.CSS_SELECTOR, "figure.thumb img")[-1]
    browser.execute_script("arguments[0].scrollIntoView()", last)
    wait(browser, lambda d: d.execute_script("return arguments[0].naturalWidth", last) > 0,
         "the last thumbnail shown once scrolled to")  # fmt: skip
    more = browser.find_element(By.CSS_SELECTOR, "#thumbs button.more")
    assert more.text == "show more (200 of 205 shown)"
    # Another client removes an image shown: the next page still brings the 5 after page 1
    # (counted by position, the first of them fell out of reach).
    first_id = browser.find_element(By.CSS_SELECTOR, "figure.thumb").get_attribute("data-id")
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        client.delete(f"/v1/gallery/images/{first_id}").raise_for_status()
    browser.execute_script("arguments[0].focus()", more)  # by keyboard
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "figure.thumb")) == 205, "page 2")
    assert not browser.find_elements(By.CSS_SELECTOR, "#thumbs button.more")
    ids = [
        f.get_attribute("data-id") for f in browser.find_elements(By.CSS_SELECTOR, "figure.thumb")
    ]
    assert len(set(ids)) == 205
    assert focused(browser, "data-id") == ids[200]  # not lost with the button


# ------------------------------------------------------------------------------ phone, errors


@pytest.fixture
def phone(browser):
    """The browser as a 390x844 phone screen (touch, viewport meta honoured)."""
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True},
    )
    yield browser
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def open_page(driver: WebDriver, server, key: str = KEY) -> None:
    """The page, with `key` in the API key box, its labels listed."""
    driver.get(f"{server.url}/")
    if not key:  # the key an earlier test entered is kept for the browser's session
        driver.execute_script("sessionStorage.clear()")
        driver.get(f"{server.url}/")
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    if key:
        field.send_keys(key, Keys.TAB)
        summary = driver.find_element(By.ID, "gallery-summary")
        wait(driver, lambda d: " label" in summary.text, "the gallery loaded")


def choose_label(driver: WebDriver, label: str) -> None:
    driver.execute_script(
        "document.querySelector(`#labels button[data-label='${arguments[0]}']`).click()", label
    )
    wait(
        driver,
        lambda d: d.find_element(By.ID, "label-title").text.startswith(f"{label} ("),
        f"{label} shown",
    )


def overflowing(driver: WebDriver) -> list[str]:
    """The page's width if wider than the screen, and the visible elements that stick out."""
    return driver.execute_script(
        """
        const width = document.documentElement.clientWidth, out = [];
        if (document.documentElement.scrollWidth > width)
          out.push(`page ${document.documentElement.scrollWidth} px wide`);
        for (const node of document.querySelectorAll("body *")) {
          const box = node.getBoundingClientRect();
          if (box.width && box.height && (box.right > width + 0.5 || box.left < -0.5))
            out.push(`${node.tagName.toLowerCase()}#${node.id}.${node.className} ` +
                     `${Math.round(box.left)}..${Math.round(box.right)}`);
        }
        return out;
        """
    )


def cut_placeholders(driver: WebDriver) -> list[str]:
    """The inputs whose placeholder is wider than the room inside them."""
    return driver.execute_script(
        """
        const context = document.createElement("canvas").getContext("2d");
        return [...document.querySelectorAll("input[placeholder]")].filter((input) => {
          const style = getComputedStyle(input);
          context.font = style.font;
          const room = input.clientWidth - parseFloat(style.paddingLeft)
            - parseFloat(style.paddingRight);
          return context.measureText(input.placeholder).width > room;
        }).map((input) => input.id);
        """
    )


def test_the_page_fits_a_phone_screen(serving_library, server, phone):
    open_page(phone, server)
    assert phone.execute_script("return window.innerWidth") == 390
    assert not overflowing(phone)
    assert not cut_placeholders(phone)
    shelf, products = serving_library.demo.shelves[0]
    phone.find_element(By.ID, "photo").send_keys(str(shelf))
    wait(phone, lambda d: len(texts(d, "#results li")) == len(products), "results shown")
    choose_label(phone, "Many")  # the longest list: 200 thumbnails and a button for more
    # Below the label list: fetched once scrolled to.
    phone.execute_script("document.getElementById('thumbs').scrollIntoView()")
    wait(phone, lambda d: loaded_thumbnails(d) >= 4, "thumbnails shown")
    assert not overflowing(phone)
    # One column: the thumbnails are below the label list, not beside it.
    labels = phone.find_element(By.ID, "labels").rect
    thumbs = phone.find_element(By.ID, "thumbs").rect
    assert thumbs["y"] >= labels["y"] + labels["height"]
    add = phone.find_element(By.CSS_SELECTOR, "#add-form button[type=submit]")
    phone.execute_script("arguments[0].scrollIntoView()", add)
    assert add.text == "Add" and add.rect["x"] + add.rect["width"] <= 390


def test_captions_of_products_side_by_side_do_not_run_into_each_other(
    serving_library, server, phone
):
    """A shelf of four products on a phone: each caption was as wide as its label, over the
    next product's caption, both unreadable."""
    open_page(phone, server)
    shelf, products = serving_library.demo.shelves[0]
    phone.find_element(By.ID, "photo").send_keys(str(shelf))
    wait(phone, lambda d: len(texts(d, "#results li")) == len(products), "results shown")
    captions = phone.execute_script(
        "return [...document.querySelectorAll('#overlay text')]"
        ".map((t) => [t.textContent, t.getBoundingClientRect().toJSON()])"
    )
    assert len(captions) == len(products)
    for index, (text, box) in enumerate(captions):
        shown = text.removesuffix("…")  # the label and score, or the start of the label
        assert any(f"{p} ".startswith(shown) or shown.startswith(f"{p} ") for p in products)
        for other_text, other in captions[index + 1 :]:
            apart = (
                box["right"] <= other["left"]
                or other["right"] <= box["left"]
                or box["bottom"] <= other["top"]
                or other["bottom"] <= box["top"]
            )
            assert apart, (text, box, other_text, other)


# The page's fetch, wrapped: the answer to the next request arguments[0] (method, path and query,
# "POST /v1/recognize") is held until the test lets it through (RELEASE_HELD), so that it
# arrives after later answers, or so that the page can be seen waiting for it.
HOLD_NEXT = """
window.holding = arguments[0];
window.release = null;
if (!window.realFetch) {
  window.realFetch = window.fetch;
  window.fetch = (url, options = {}) => {
    const answer = window.realFetch(url, options);
    const { pathname, search } = new URL(url, document.baseURI); // the page's URLs are relative
    if (`${options.method || "GET"} ${pathname}${search}` !== window.holding) return answer;
    window.holding = null;
    return new Promise((resolve) => {
      window.release = () => { resolve(answer); return answer; };
    });
  };
}
"""
RELEASE_HELD = """
const done = arguments[arguments.length - 1];
window.release().then(() => setTimeout(done, 500), () => setTimeout(done, 500));
"""


def held(driver: WebDriver) -> bool:
    return driver.execute_script("return !!window.release")


def disabled(driver: WebDriver, selector: str) -> list[bool]:
    """Whether each of the buttons `selector` finds is disabled."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.disabled)", selector
    )


def test_an_answer_for_a_replaced_photo_is_dropped(serving_library, server, browser):
    open_page(browser, server)
    browser.execute_script(HOLD_NEXT, "POST /v1/recognize")
    (first, _), (second, products) = serving_library.demo.shelves[:2]
    photo = browser.find_element(By.ID, "photo")
    photo.send_keys(str(first))
    wait(browser, held, "first request held")
    photo.send_keys(str(second))
    wait(browser, lambda d: len(texts(d, "#results li")) == len(products), "second photo's results")
    shown = sorted(texts(browser, "#results li button"))
    browser.execute_async_script(RELEASE_HELD)  # the first photo's answer arrives now
    assert sorted(texts(browser, "#results li button")) == shown
    # A result's label shows that label's images, to see what the photo was matched with.
    browser.find_element(By.CSS_SELECTOR, "#results li button").click()
    title = browser.find_element(By.ID, "label-title")
    first = texts(browser, "#results li button")[0]
    wait(browser, lambda d: title.text.startswith(f"{first} ("), "the label's images shown")
    assert focused(browser, "id") == "label-title"
    # (the earlier test renamed Lemon Soda)
    assert [label.removesuffix(" Zero") for label in shown] == sorted(products)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#overlay rect.box")) == len(products)
    assert browser.find_element(By.ID, "recognise-status").text == f"{len(products)} recognised"


# Drags the files of a file input the test made (the only way to give the page real files)
# onto the element with id arguments[1], and drops them there; returns whether the page
# took the drop (the browser's own action, leaving the page to open the file, is prevented).
DROP_FILES = """
const [source, target] = [arguments[0], document.getElementById(arguments[1])];
const transfer = new DataTransfer();
for (const file of source.files) transfer.items.add(file);
const event = (type) => new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true});
target.dispatchEvent(event("dragenter"));
target.dispatchEvent(event("dragover"));
return !target.dispatchEvent(event("drop"));
"""


def test_dropped_files_are_recognised_or_chosen_for_adding(serving_library, server, browser):
    """A photo dropped on the recognise section is recognised; images dropped on the add form
    are chosen for it; files dropped anywhere else do not take the browser off the page."""
    open_page(browser, server)
    source = browser.execute_script(
        "const input = Object.assign(document.createElement('input'), {type: 'file', multiple: true});"
        "document.body.append(input); return input;"
    )
    shelf, products = serving_library.demo.shelves[1]
    source.send_keys(str(shelf))
    assert browser.execute_script(DROP_FILES, source, "recognise")
    wait(browser, lambda d: len(texts(d, "#results li")) == len(products), "results shown")
    assert browser.find_element(By.ID, "photo").get_attribute("value").endswith(shelf.name)
    source.send_keys("\n".join(str(path) for path, _ in serving_library.queries()[:2]))
    assert browser.execute_script(DROP_FILES, source, "add-form")
    assert browser.execute_script("return document.getElementById('add-files').files.length") == 3
    assert browser.execute_script(DROP_FILES, source, "gallery-summary")  # refused, not opened
    assert not browser.find_elements(By.CSS_SELECTOR, ".dropping")


def in_view(driver: WebDriver, element) -> bool:
    return driver.execute_script(
        "const box = arguments[0].getBoundingClientRect();"
        "return box.height > 0 && box.top >= -1 && box.bottom <= window.innerHeight + 1",
        element,
    )


def test_an_error_shows_next_to_the_form_that_failed(serving_library, server, phone):
    """Far down a long label on a phone, Add without the key: the reason is beside Add."""
    open_page(phone, server)
    choose_label(phone, "Many")
    phone.execute_script("document.getElementById('api-key').value = ''")  # the key forgotten
    label = phone.find_element(By.ID, "add-label")
    label.clear()
    label.send_keys("Many")
    phone.find_element(By.ID, "add-files").send_keys(str(serving_library.queries()[0][0]))
    phone.find_element(By.CSS_SELECTOR, "#add-form button[type=submit]").click()
    status = phone.find_element(By.ID, "add-status")
    wait(phone, lambda d: "need the API key" in status.text, "the error beside the form")
    assert "error" in status.get_attribute("class").split()
    assert in_view(phone, status)
    assert not phone.find_element(By.ID, "message").is_displayed()


def test_many_images_are_added_in_requests_within_the_limits(server, browser, tmp_path):
    """More files than one request may hold (32), and more bytes (20 MB): the page sends them
    in several requests; a file that is no image fails alone, named, and the rest go in."""
    small = make_images(tmp_path / "small", 34, seed=11)
    rng = np.random.default_rng(3)
    large = []
    for number in range(8):  # noise does not compress: about 2.7 MB each, 21.6 MB together
        path = tmp_path / f"noise{number}.png"
        Image.fromarray(rng.integers(0, 256, (950, 950, 3), dtype=np.uint8)).save(path)
        large.append(path)
    assert sum(p.stat().st_size for p in large) > 20 << 20
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is no image")
    files = [*small[:20], broken, *large, *small[20:]]
    open_page(browser, server)
    label = browser.find_element(By.ID, "add-label")
    label.clear()
    label.send_keys("Bulk")
    browser.find_element(By.ID, "add-files").send_keys("\n".join(map(str, files)))
    browser.find_element(By.CSS_SELECTOR, "#add-form button[type=submit]").click()
    status = browser.find_element(By.ID, "add-status")
    wait(browser, lambda d: status.text.startswith("added"), "all requests answered")
    assert status.text == 'added 42 to "Bulk"; 1 could not be added:'
    assert texts(browser, "#add-failures li") == [
        "broken.jpg: not an image file (expected JPEG, PNG, WebP, BMP, TIFF or GIF; "
        "got 16 bytes starting b'this is '"
        ")"
    ]
    wait(
        browser,
        lambda d: d.find_element(By.ID, "label-title").text == "Bulk (42 images)",
        "the label shown",
    )
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}) as client:
        listed = client.get("/v1/gallery/labels/Bulk").json()
    stored = [Path(image["name"]).stem.rsplit("-", 1)[0] for image in listed["images"]]
    assert sorted(stored) == sorted(p.stem for p in files if p != broken)


@contextmanager
def server_kept_busy(server) -> Iterator[None]:
    """Every request slot of the server (--max-connections) held by an upload still being
    sent: any other request gets 503, as it does while another process holds the library's
    write lock (which a page's edit waits a minute for)."""
    url = httpx.URL(server.url)
    stalled = [socket.create_connection((url.host, url.port)) for _ in range(DEFAULT_MAX_REQUESTS)]
    try:
        for connection in stalled:  # a body of 100 bytes, one sent
            connection.sendall(
                b"POST /v1/recognize HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: "
                + KEY.encode()
                + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
        wait_for_slots(server, busy=True)  # all of them in progress
        yield
    finally:
        for connection in stalled:
            connection.close()
    wait_for_slots(server, busy=False)  # the server saw them go


def wait_for_slots(server, busy: bool) -> None:
    """Until the page (a request that takes a slot: /healthz is answered past the limit)
    answers 503 (`busy`) or 200."""
    deadline = time.monotonic() + WAIT_S
    with httpx.Client(base_url=server.url, timeout=10) as client:
        while client.get("/").status_code != (503 if busy else 200):
            assert time.monotonic() < deadline, f"the page never {'busy' if busy else 'ok'}"
            time.sleep(0.1)


def test_a_busy_server_stops_an_add_at_its_first_refusal(server, browser, tmp_path):
    """A 503 (another process's long write to the library, or every slot in use) ends the
    add there, saying why: the page no longer sends every other request to meet the same
    answer (each after a minute's wait, for the library's lock) and list each file as failed."""
    first, *rest = make_images(tmp_path / "busy", 41, seed=17)
    open_page(browser, server)
    label = browser.find_element(By.ID, "add-label")
    label.clear()
    label.send_keys("Busy")
    files = browser.find_element(By.ID, "add-files")
    files.send_keys(str(first))
    browser.execute_script(HOLD_NEXT, "POST /v1/gallery/images")
    browser.find_element(By.CSS_SELECTOR, "#add-form button[type=submit]").click()
    wait(browser, held, "the add sent")
    assert disabled(browser, "#add-form button") == [True]  # not sent twice
    browser.execute_async_script(RELEASE_HELD)
    title = browser.find_element(By.ID, "label-title")
    wait(browser, lambda d: title.text == "Busy (1 image)", "the first image added")
    assert disabled(browser, "#add-form button") == [False]
    wait(browser, lambda d: loaded_thumbnails(d) == 1, "its thumbnail shown")
    files.send_keys("\n".join(map(str, rest)))  # two requests: 32 images, then 8
    status = browser.find_element(By.ID, "add-status")
    with server_kept_busy(server):
        browser.find_element(By.CSS_SELECTOR, "#add-form button[type=submit]").click()
        wait(browser, lambda d: status.text and not status.text.startswith("adding"), "ended")
    assert status.text.startswith(f"the server is busy: {DEFAULT_MAX_REQUESTS} requests in")
    assert "error" in status.get_attribute("class").split()
    assert not texts(browser, "#add-failures li")


@contextmanager
def offline(driver: WebDriver) -> Iterator[None]:
    """The browser's network cut off: a request gets no answer at all."""
    driver.execute_cdp_cmd("Network.enable", {})
    conditions = {"latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {**conditions, "offline": True})
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", {**conditions, "offline": False})


def test_no_answer_from_the_server_is_said_in_words(server, browser):
    """Not the browser's bare "Failed to fetch"."""
    open_page(browser, server)
    with offline(browser):
        browser.execute_script("document.querySelector('#labels button').click()")
        status = browser.find_element(By.ID, "label-status")
        wait(browser, lambda d: status.text, "the error shown")
    assert status.text.startswith("no answer from the server (Failed to fetch): is it still")
    assert "error" in status.get_attribute("class").split()


def test_an_api_key_a_browser_cannot_send_is_named_as_such(server, browser):
    """A character outside Latin-1 (a typographic quote pasted with the key) cannot go in a
    header: the browser's fetch refused it, and the page said the server did not answer."""
    open_page(browser, server)
    # One change of the key, as pasting it over the old one makes: clear() then typing
    # made two, and the 401 of the first (an empty key) could arrive after the refusal.
    browser.execute_script(
        "const field = document.getElementById('api-key');"
        "field.value = arguments[0]; field.dispatchEvent(new Event('change'));",
        f"{KEY}\u2019",
    )
    message = browser.find_element(By.ID, "message")
    wait(browser, lambda d: message.text, "the error shown")
    assert message.text == (
        "the API key holds a character no browser can send (’): check the API key box at "
        "the top of the page"
    )
    open_page(browser, server)  # the right key again, for the tests after this one


# Gives the API key box the value arguments[0], as typing it and leaving the box does.
CHANGE_KEY = """
const field = document.getElementById('api-key');
field.value = arguments[0];
field.dispatchEvent(new Event('change'));
"""


def test_an_answer_for_an_earlier_api_key_is_dropped(server, browser, tmp_path):
    """Reads answered after the key changed (held here until the new key's answers are
    shown) no longer replace what those show: the gallery of the right key that came after
    the wrong one's refusal, or a 403 of the wrong key after the right one's images. An
    edit's outcome is still reported, though the gallery it drew after was an earlier
    key's."""
    open_page(browser, server)
    summary = browser.find_element(By.ID, "gallery-summary")
    message = browser.find_element(By.ID, "message")
    browser.execute_script(HOLD_NEXT, "GET /v1/gallery/labels")
    browser.execute_script(CHANGE_KEY, KEY)  # the same key again: the gallery read anew
    wait(browser, held, "the right key's labels asked for")
    browser.execute_script(CHANGE_KEY, "wrong")
    wait(browser, lambda d: summary.text == "wrong API key", "the wrong key refused")
    browser.execute_async_script(RELEASE_HELD)  # the right key's labels arrive now
    assert summary.text == "wrong API key"
    assert message.text == "wrong API key (check the API key at the top of the page)"
    label = browser.find_element(By.CSS_SELECTOR, "#labels button").get_attribute("data-label")
    asked = browser.execute_script(  # the label's images, as the page asks for them
        "return `GET /v1/gallery/label?${new URLSearchParams({label: arguments[0]})}`", label
    )
    browser.execute_script(HOLD_NEXT, asked)
    browser.execute_script("document.querySelector('#labels button').click()")
    wait(browser, held, "the label's images asked for with the wrong key")
    browser.execute_script(CHANGE_KEY, KEY)
    title = browser.find_element(By.ID, "label-title")
    wait(browser, lambda d: title.text.startswith(f"{label} ("), "the label's images shown")
    browser.execute_async_script(RELEASE_HELD)  # the wrong key's 403 arrives now
    assert browser.find_element(By.ID, "label-status").text == ""
    assert not message.is_displayed()
    assert title.text.startswith(f"{label} (")
    # the gallery drawn after the add, asked for before the key's change
    add_across_a_key_change(browser, server, tmp_path, "Rekeyed", 59, "GET /v1/gallery/labels")


def add_across_a_key_change(
    browser, server, tmp_path: Path, label: str, seed: int, request: str
) -> None:
    """Add a new image under `label`, holding the `request` the add makes until the API
    key has changed (to the same key): the add is reported all the same. The label is then
    removed, for the later tests; `seed` makes an image no other test adds."""
    add_label = browser.find_element(By.ID, "add-label")
    add_label.clear()
    add_label.send_keys(label)
    (image,) = make_images(tmp_path, 1, seed=seed)
    browser.find_element(By.ID, "add-files").send_keys(str(image))
    browser.execute_script(HOLD_NEXT, request)
    browser.find_element(By.CSS_SELECTOR, "#add-form button[type=submit]").click()
    wait(browser, held, f"{request} asked for by the add")
    browser.execute_script(CHANGE_KEY, KEY)
    browser.execute_async_script(RELEASE_HELD)
    status = browser.find_element(By.ID, "add-status")
    wait(browser, lambda d: status.text == f'added 1 to "{label}"', "the add reported")
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}) as client:
        client.delete(f"/v1/gallery/labels/{label}").raise_for_status()


def test_an_add_goes_on_when_the_api_key_changes_as_it_asks_for_the_limits(
    server, browser, tmp_path
):
    """The server's limits (/healthz, which needs no key) answered after the key changed
    were dropped as an earlier key's answer: the add stopped there, saying nothing."""
    open_page(browser, server)  # a new page: the limits not yet asked for
    add_across_a_key_change(browser, server, tmp_path, "Limits", 61, "GET /healthz")


def test_a_label_the_server_refuses_stops_an_add_at_once(server, browser, tmp_path):
    """A refused label is said once: the page no longer splits the request down to single
    files, each refused for the same label, and lists every file as failed."""
    open_page(browser, server)
    label = browser.find_element(By.ID, "add-label")
    label.clear()
    label.send_keys("   ")  # passes the field's `required`
    images = make_images(tmp_path, 4, seed=31)
    browser.find_element(By.ID, "add-files").send_keys("\n".join(map(str, images)))
    browser.find_element(By.CSS_SELECTOR, "#add-form button[type=submit]").click()
    status = browser.find_element(By.ID, "add-status")
    wait(browser, lambda d: status.text and not status.text.startswith("adding"), "ended")
    assert status.text == "the label is empty"
    assert "error" in status.get_attribute("class").split()
    assert not texts(browser, "#add-failures li")


def test_renaming_onto_an_existing_label_asks_before_merging(server, browser):
    open_page(browser, server)
    choose_label(browser, "Cocoa Crunch")
    rename = browser.find_element(By.ID, "rename-input")
    rename.clear()
    rename.send_keys("Tomato Soup", Keys.ENTER)
    alert = wait(browser, lambda d: d.switch_to.alert, "asked before merging")
    assert alert.text == (
        '"Tomato Soup" already has 3 images: merge the images of "Cocoa Crunch" into it?'
    )
    alert.dismiss()  # nothing changes
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}) as client:
        assert client.get("/v1/gallery/labels/Cocoa Crunch").json()["count"] == 3
    rename.send_keys(Keys.ENTER)
    wait(browser, lambda d: d.switch_to.alert, "asked again").accept()
    status = browser.find_element(By.ID, "label-status")
    wait(browser, lambda d: status.text.startswith("merged"), "merged")
    assert status.text == 'merged "Cocoa Crunch" into "Tomato Soup": 3 images moved, 6 images now'
    wait(
        browser,
        lambda d: d.find_element(By.ID, "label-title").text == "Tomato Soup (6 images)",
        "the merged label shown",
    )
    assert not browser.find_elements(By.CSS_SELECTOR, '#labels button[data-label="Cocoa Crunch"]')


def test_adding_to_a_label_written_as_a_listed_one_in_another_case_asks_first(
    server, browser, tmp_path
):
    """ "tomato soup" typed for "Tomato Soup": the images went to a second label of the same
    product, without a word."""
    open_page(browser, server)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}) as client:
        listed = client.get("/v1/gallery/labels/Tomato Soup").json()["count"]
        browser.find_element(By.ID, "add-label").send_keys("tomato soup")
        browser.find_element(By.ID, "add-files").send_keys(
            str(make_images(tmp_path, 1, seed=53)[0])
        )
        browser.find_element(By.CSS_SELECTOR, "#add-form button[type=submit]").click()
        labels = labels_after_declining(
            browser,
            client,
            f'The gallery has "Tomato Soup" ({listed} images), not "tomato soup": '
            'add the images to a new label "tomato soup"?',
        )
        assert "tomato soup" not in labels
        assert browser.find_element(By.ID, "add-status").text == ""


def labels_after_declining(browser, client: httpx.Client, question: str) -> list[str]:
    """Answer no to the page's `question` about a label written as a listed one in another
    case; the gallery's labels then, which nothing was sent to change."""
    alert = wait(browser, lambda d: d.switch_to.alert, "asked before a new label")
    assert alert.text == question
    alert.dismiss()
    return [entry["label"] for entry in client.get("/v1/gallery/labels").json()["labels"]]


def test_renaming_to_a_label_written_as_a_listed_one_in_another_case_asks_first(
    server, browser, tmp_path
):
    """ "kiwi" renamed to "tomato soup" beside "Tomato Soup" made a second label of that
    product, unasked, as an add did; the case of "kiwi" itself changes without a question."""
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        add_one_image_each(client, ["kiwi"], make_images(tmp_path, 1, seed=59))
        listed = client.get("/v1/gallery/labels/Tomato Soup").json()["count"]
        open_page(browser, server)
        choose_label(browser, "kiwi")
        rename = browser.find_element(By.ID, "rename-input")
        rename.clear()
        rename.send_keys("tomato soup", Keys.ENTER)
        labels = labels_after_declining(
            browser,
            client,
            f'The gallery has "Tomato Soup" ({listed} images), not "tomato soup": '
            'rename "kiwi" to a new label "tomato soup"?',
        )
        assert "kiwi" in labels and "tomato soup" not in labels
        rename.clear()
        rename.send_keys("Kiwi", Keys.ENTER)
        status = browser.find_element(By.ID, "label-status")
        wait(browser, lambda d: status.text.startswith("renamed"), "renamed unasked")
        assert status.text == 'renamed "kiwi" to "Kiwi" (1 image)'
        client.delete("/v1/gallery/labels/Kiwi").raise_for_status()


def test_a_label_given_images_elsewhere_is_not_merged_into_unasked(server, browser, tmp_path):
    """Renamed onto a label another client created after the page listed the labels: the
    page had not asked, so nothing is merged (it was, silently); the label is listed, and
    renaming again asks first."""
    images = make_images(tmp_path, 2, seed=47)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        add_one_image_each(client, ["Renamed here"], images[:1])
        open_page(browser, server)
        choose_label(browser, "Renamed here")
        add_one_image_each(client, ["Came elsewhere"], images[1:])
        rename = browser.find_element(By.ID, "rename-input")
        rename.clear()
        rename.send_keys("Came elsewhere", Keys.ENTER)
        status = browser.find_element(By.ID, "label-status")
        wait(browser, lambda d: "has images now" in status.text, "the refusal shown")
        assert (
            status.text == '"Came elsewhere" has images now, added elsewhere: rename again to merge'
        )
        for label in ("Renamed here", "Came elsewhere"):
            assert client.get("/v1/gallery/label", params={"label": label}).json()["count"] == 1
        assert label_button(browser, "Came elsewhere")
        rename.send_keys(Keys.ENTER)  # the name typed is kept
        alert = wait(browser, lambda d: d.switch_to.alert, "asked before merging")
        assert alert.text.startswith('"Came elsewhere" already has 1 image: merge')
        alert.accept()
        wait(browser, lambda d: status.text.startswith("merged"), "merged")
        client.delete("/v1/gallery/label", params={"label": "Came elsewhere"}).raise_for_status()


def test_edits_say_what_they_are_doing_while_they_wait(serving_library, server, browser):
    """An edit may wait a minute for another process's write to the library: the page says
    at once what it is doing (it said nothing until the answer came), and its buttons are
    disabled meanwhile (a second click sent the edit again, which failed with a 404)."""
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        for number, (image, _) in enumerate(serving_library.queries()[:2]):
            files = {"image": (f"held{number}.jpg", image.read_bytes(), "image/jpeg")}
            added = client.post("/v1/gallery/images", data={"label": "Held"}, files=files)
            assert added.status_code == 201, added.text
    open_page(browser, server)
    choose_label(browser, "Held")
    status = browser.find_element(By.ID, "label-status")
    rename = browser.find_element(By.ID, "rename-input")
    rename.clear()
    browser.execute_script(HOLD_NEXT, "PATCH /v1/gallery/label?label=Held")
    rename.send_keys("Held on", Keys.ENTER)
    wait(browser, held, "the rename sent")
    assert status.text == 'renaming "Held"…'
    assert disabled(browser, "#rename-form button") == [True, True]
    browser.execute_async_script(RELEASE_HELD)
    wait(browser, lambda d: status.text.startswith("renamed"), "renamed")
    title = browser.find_element(By.ID, "label-title")
    wait(browser, lambda d: title.text == "Held on (2 images)", "the renamed label shown")
    image_id = browser.find_element(By.CSS_SELECTOR, "figure.thumb").get_attribute("data-id")
    browser.execute_script(HOLD_NEXT, f"DELETE /v1/gallery/images/{image_id}")
    browser.find_element(By.CSS_SELECTOR, "figure.thumb button").click()
    browser.switch_to.alert.accept()
    wait(browser, held, "the image's delete sent")
    assert status.text == f"deleting image #{image_id}…"
    assert disabled(browser, f'figure[data-id="{image_id}"] button') == [True]
    browser.execute_async_script(RELEASE_HELD)
    wait(browser, lambda d: title.text == "Held on (1 image)", "the image deleted")
    assert status.text == f"deleted image #{image_id}"
    browser.execute_script(HOLD_NEXT, "DELETE /v1/gallery/label?label=Held+on")
    browser.find_element(By.ID, "delete-label").click()
    browser.switch_to.alert.accept()
    wait(browser, held, "the label's delete sent")
    assert status.text == 'deleting "Held on"…'
    assert disabled(browser, "#rename-form button") == [True, True]
    browser.execute_async_script(RELEASE_HELD)
    wait(browser, lambda d: status.text == "deleted 1 image", "the label deleted")
    assert disabled(browser, "#rename-form button") == [False, False]


def test_a_label_removed_elsewhere_leaves_the_list(server, browser, tmp_path):
    """Chosen after another client removed it: the reason, and the list drawn anew (it kept
    offering the label, each click the same error)."""
    (image,) = make_images(tmp_path, 1, seed=37)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        files = {"image": (image.name, image.read_bytes(), "image/png")}
        assert client.post("/v1/gallery/images", data={"label": "Gone"}, files=files).is_success
        open_page(browser, server)
        assert label_button(browser, "Gone")
        client.delete("/v1/gallery/labels/Gone").raise_for_status()
    browser.execute_script(
        """document.querySelector('#labels button[data-label="Gone"]').click()"""
    )
    status = browser.find_element(By.ID, "label-status")
    wait(browser, lambda d: status.text, "the reason shown")
    assert status.text == "no gallery images labelled 'Gone'"
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, '#labels button[data-label="Gone"]'),
         "the label gone from the list")  # fmt: skip
    assert browser.find_element(By.ID, "label-title").text == "Choose a label"


def test_images_without_a_preview_say_why(server, browser, tmp_path):
    """Images the server has no file of, one added as a vector and one whose file was
    deleted, are listed without a thumbnail (nothing is fetched), and say so in place; one
    whose file cannot be read says why (the 404's reason) on hovering."""
    deleted, damaged = make_images(tmp_path, 2, seed=71)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        files = [
            ("image", (path.name, path.read_bytes(), "image/png")) for path in (deleted, damaged)
        ]
        added = client.post("/v1/gallery/images", data={"label": "No file"}, files=files)
        stored = [server.gallery / "uploads" / image["name"] for image in added.json()["added"]]
        stored[0].unlink()
        stored[1].write_bytes(b"not an image any more")
        with Gallery.open(server.gallery) as gallery:  # another process's write
            gallery.add(np.eye(1, gallery.manifest.embedding_dim, dtype=np.float32), ["No file"])
        deadline = time.monotonic() + WAIT_S  # the server loads it within about a second
        while client.get("/v1/gallery/labels/No file").json()["count"] != 3:
            assert time.monotonic() < deadline, "the server never loaded the vector"
            time.sleep(0.2)
        open_page(browser, server)
        choose_label(browser, "No file")
        titles = "return [...document.querySelectorAll('#thumbs img')].map((img) => img.title)"
        wait(browser, lambda d: all(d.execute_script(titles) or [""]), "each one explained")
        no_file = "(no preview: the server has no file of this image)"
        (unreadable,) = [title for title in browser.execute_script(titles) if title != no_file]
        assert browser.execute_script(titles).count(no_file) == 2
        assert unreadable.startswith("the image file cannot be read (cannot identify image file")
        client.delete("/v1/gallery/labels/No file").raise_for_status()


def add_one_image_each(client: httpx.Client, labels: list[str], images: list[Path]) -> None:
    """Add `images[i]` under `labels[i]` through the API."""
    for label, image in zip(labels, images, strict=True):
        files = {"image": (image.name, image.read_bytes(), "image/png")}
        added = client.post("/v1/gallery/images", data={"label": label}, files=files)
        assert added.status_code == 201 and added.json()["added"], added.text


def test_labels_a_url_path_cannot_carry_are_shown_and_edited(server, browser, tmp_path):
    """'.' and '..' (the browser resolves them out of a path, encoded too), '//', and '#',
    '?', '%', '+': each label's images are shown, and '..' is deleted from the page."""
    names = [".", "..", "a//b", "#1 ?% + x"]
    images = make_images(tmp_path, len(names), seed=43)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        add_one_image_each(client, names, images)
    open_page(browser, server)
    for name in names:
        choose_label(browser, name)
        assert browser.find_element(By.ID, "label-title").text == f"{name} (1 image)"
        wait(browser, lambda d: loaded_thumbnails(d) == 1, f"the image of {name!r} shown")
    choose_label(browser, "..")
    browser.find_element(By.ID, "delete-label").click()
    browser.switch_to.alert.accept()
    status = browser.find_element(By.ID, "label-status")
    wait(browser, lambda d: status.text == "deleted 1 image", "the label deleted")
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        listed = [entry["label"] for entry in client.get("/v1/gallery/labels").json()["labels"]]
        assert [name for name in names if name in listed] == [".", "a//b", "#1 ?% + x"]
        for name in [".", "a//b", "#1 ?% + x"]:
            client.delete("/v1/gallery/label", params={"label": name}).raise_for_status()


def test_a_failed_recognition_leaves_no_photo_behind(serving_library, server, browser, tmp_path):
    open_page(browser, server, key="")
    summary = browser.find_element(By.ID, "gallery-summary")
    wait(browser, lambda d: summary.text == "API key needed", "the header says what is missing")
    open_page(browser, server)
    photo = browser.find_element(By.ID, "photo")
    shelf, products = serving_library.demo.shelves[0]
    photo.send_keys(str(shelf))
    wait(browser, lambda d: len(texts(d, "#results li")) == len(products), "results shown")
    broken = tmp_path / "holiday.jpg"
    broken.write_bytes(b"no image here")
    photo.send_keys(str(broken))
    status = browser.find_element(By.ID, "recognise-status")
    wait(browser, lambda d: "not an image file" in status.text, "the reason shown")
    assert status.text.startswith("holiday.jpg: not an image file")
    assert not browser.find_element(By.ID, "stage").is_displayed()
    assert not browser.find_element(By.ID, "photo-view").get_attribute("src")
    assert not texts(browser, "#results li")
    assert not browser.find_elements(By.CSS_SELECTOR, "#overlay rect")


def choose_by_dialog(driver: WebDriver, field, path: Path) -> None:
    """`path` chosen in `field`'s file dialog as a user does: the field clicked (the dialog
    held back, not opened and cancelled as headless Chromium does), then the file picked."""
    driver.execute_cdp_cmd("Page.setInterceptFileChooserDialog", {"enabled": True})
    try:
        ActionChains(driver).click(field).perform()  # a pointer's click: WebDriver's is refused
        field.send_keys(str(path))
    finally:
        driver.execute_cdp_cmd("Page.setInterceptFileChooserDialog", {"enabled": False})


def test_the_same_photo_chosen_again_is_recognised_again(serving_library, server, browser):
    """Choosing the photo a file input already holds is no change to it: the photo refused for
    a wrong key was not sent again once the key was right, and the page said nothing."""
    open_page(browser, server)
    key = browser.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys("wrong-key", Keys.TAB)
    photo = browser.find_element(By.ID, "photo")
    shelf, products = serving_library.demo.shelves[0]
    choose_by_dialog(browser, photo, shelf)
    status = browser.find_element(By.ID, "recognise-status")
    wait(browser, lambda d: "wrong API key" in status.text, "the refusal shown")
    key.clear()
    key.send_keys(KEY, Keys.TAB)
    choose_by_dialog(browser, photo, shelf)
    wait(browser, lambda d: len(texts(d, "#results li")) == len(products), "results shown")
    assert status.text == f"{len(products)} recognised"


def test_controls_have_names_and_status_lines_are_announced(server, browser):
    open_page(browser, server)
    choose_label(browser, "Tomato Soup")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "figure.thumb button"), "thumbnails")
    for figure in browser.find_elements(By.CSS_SELECTOR, "figure.thumb"):
        button = figure.find_element(By.TAG_NAME, "button")
        assert button.accessible_name == f"delete image #{figure.get_attribute('data-id')}"
    chosen = browser.find_elements(By.CSS_SELECTOR, '#labels button[aria-current="true"]')
    assert [button.get_attribute("data-label") for button in chosen] == ["Tomato Soup"]
    # Named "label, count", not the two run together ("Tomato Soup6"); the whole label on
    # hover, where the list cuts a long one short.
    assert chosen[0].accessible_name == "Tomato Soup, 6 images"
    assert chosen[0].get_attribute("title") == "Tomato Soup"
    caption = browser.find_element(By.CSS_SELECTOR, "figure.thumb figcaption")
    assert caption.get_attribute("title") == caption.text
    assert browser.find_element(By.ID, "label-filter").accessible_name == "filter labels"
    for status in ("recognise-status", "label-status", "add-status"):
        assert browser.find_element(By.ID, status).get_attribute("aria-live") == "polite"


def test_labels_are_listed_in_the_order_a_reader_expects(server, browser, tmp_path):
    """Not in code point order, which put every capital before "apple", "Äpfel" after
    "Zucchini", and "Item 10" before "Item 2"."""
    names = ["Zucchini", "apple", "Äpfel", "Item 10", "Item 2"]
    images = make_images(tmp_path, len(names), seed=23)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        add_one_image_each(client, names, images)
        open_page(browser, server)
        # Read in one step: the list may be drawn again meanwhile (two loads at start).
        listed = browser.execute_script(
            "return [...document.querySelectorAll('#labels button')].map((b) => b.dataset.label)"
        )
        assert [label for label in listed if label in names] == [
            "Äpfel",
            "apple",
            "Item 2",
            "Item 10",
            "Zucchini",
        ]
        for name in names:
            client.delete(f"/v1/gallery/labels/{name}").raise_for_status()


def test_the_label_filter_ignores_case_and_accents_and_says_when_nothing_matches(
    server, browser, tmp_path
):
    (image,) = make_images(tmp_path, 1, seed=29)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        files = {"image": (image.name, image.read_bytes(), "image/png")}
        added = client.post("/v1/gallery/images", data={"label": "Café Crème"}, files=files)
        assert added.status_code == 201 and added.json()["added"], added.text
    open_page(browser, server)
    listed = len(texts(browser, "#labels button"))
    search = browser.find_element(By.ID, "label-filter")
    search.send_keys("CAFE CREME")
    assert browser.execute_script(
        "return [...document.querySelectorAll('#labels button')].map((b) => b.dataset.label)"
    ) == ["Café Crème"]
    search.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
    search.send_keys("  no such <label> ")
    assert texts(browser, "#labels li") == ['no label contains "no such <label>"']
    search.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
    assert len(texts(browser, "#labels button")) == listed


def test_captions_are_readable_and_inside_a_wide_photo(serving_library, server, browser, tmp_path):
    """A shelf at the right end of a photo 8 times as wide: shown about 0.1 times its size,
    captions in photo pixels would be 2 px high and run off the right edge."""
    shelf, products = serving_library.demo.shelves[0]
    with Image.open(shelf) as photo:
        pixels = np.asarray(photo.convert("RGB"))
    wide = tmp_path / "wide.png"
    Image.fromarray(np.pad(pixels, ((0, 0), (7 * pixels.shape[1], 0), (0, 0)), "edge")).save(wide)
    open_page(browser, server)
    browser.find_element(By.ID, "photo").send_keys(str(wide))
    wait(browser, lambda d: len(texts(d, "#results li")) == len(products), "results shown")
    photo_box, captions = browser.execute_script(
        "const box = (node) => node.getBoundingClientRect().toJSON();"
        "return [box(document.getElementById('photo-view')),"
        "        [...document.querySelectorAll('#overlay text')].map(box)]"
    )
    assert photo_box["width"] < pixels.shape[1]  # scaled down
    assert len(captions) == len(products)
    for caption in captions:
        assert caption["height"] >= 12, caption
        assert photo_box["left"] - 1 <= caption["left"], (caption, photo_box)
        assert caption["right"] <= photo_box["right"] + 1, (caption, photo_box)
        assert photo_box["top"] - 1 <= caption["top"], (caption, photo_box)
    # Read out once, from the results list, not again from the captions over the photo.
    shown = browser.execute_script(
        "return [...document.querySelectorAll('#overlay text')].map((t) => t.textContent)"
    )
    tree = browser.execute_cdp_cmd("Accessibility.getFullAXTree", {})["nodes"]
    spoken = {n.get("name", {}).get("value") for n in tree if not n.get("ignored")}
    assert not spoken & set(shown)


# Per EXIF orientation, the turn that stores an upright photo so that the orientation
# turns it upright again (the inverse of what ImageOps.exif_transpose does).
STORED_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
SHOWN_PIXELS = """
const image = document.getElementById('photo-view');
const canvas = document.createElement('canvas');
[canvas.width, canvas.height] = [image.naturalWidth, image.naturalHeight];
const context = canvas.getContext('2d');
context.drawImage(image, 0, 0);
const at = ([x, y]) => [...context.getImageData(x, y, 1, 1).data.slice(0, 3)];
return [canvas.width, canvas.height, arguments[0].map(at)];
"""


def test_a_webp_photo_is_shown_upright_as_the_server_reads_it(
    serving_library, server, browser, tmp_path
):
    """The server turns a photo upright by its EXIF orientation, WebP too, and answers with
    boxes in upright pixels; Chromium shows a WebP as stored (JPEG and PNG upright), so the
    boxes would be drawn over a photo turned on its side or mirrored."""
    shelf, products = serving_library.demo.shelves[0]
    upright = decode_rgb(shelf.read_bytes())
    height, width = upright.shape[:2]
    points = [(x, y) for x in range(5, width, width // 7) for y in range(5, height, height // 7)]
    open_page(browser, server)
    status = browser.find_element(By.ID, "recognise-status")
    for orientation, turn in STORED_AS.items():
        stored = Image.fromarray(upright)
        exif = Image.Exif()
        exif[0x0112] = orientation  # Orientation
        photo = tmp_path / f"shelf-{orientation}.webp"
        (stored if turn is None else stored.transpose(turn)).save(photo, lossless=True, exif=exif)
        assert np.array_equal(decode_rgb(photo.read_bytes()), upright)  # the server's view
        browser.execute_script("arguments[0].textContent = ''", status)
        browser.find_element(By.ID, "photo").send_keys(str(photo))
        wait(browser, lambda d: status.text.endswith(" recognised"), f"results of {photo.name}")
        assert status.text == f"{len(products)} recognised"
        shown_width, shown_height, pixels = browser.execute_script(SHOWN_PIXELS, points)
        assert (shown_width, shown_height) == (width, height), orientation
        expected = [upright[y, x].tolist() for x, y in points]
        assert np.abs(np.array(pixels) - expected).max() <= 2, orientation


def focused(driver: WebDriver, attribute: str) -> str | None:
    return driver.switch_to.active_element.get_attribute(attribute)


def test_keyboard_focus_stays_on_the_chosen_label_and_the_images(server, browser, tmp_path):
    images = make_images(tmp_path / "keys", 3, seed=53)  # a seed no other test uses
    files = [("image", (p.name, p.read_bytes(), "image/png")) for p in images]
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        added = client.post("/v1/gallery/images", data={"label": "Keys"}, files=files)
        assert added.status_code == 201, added.text
    open_page(browser, server)

    def enter_on_keys(driver: WebDriver) -> bool:
        focus = "document.querySelector('#labels button[data-label=\"Keys\"]').focus()"
        driver.execute_script(focus)
        if focused(driver, "data-label") != "Keys":  # not focusable yet: the page still draws
            return False
        driver.switch_to.active_element.send_keys(Keys.ENTER)
        return True

    # Tried again where the list was drawn again (its second load at start) between the
    # focus and the key: the button focused is then gone (stale) or not yet shown.
    redrawn = [StaleElementReferenceException, ElementNotInteractableException]
    WebDriverWait(browser, WAIT_S, ignored_exceptions=redrawn).until(
        enter_on_keys, "Enter pressed on the label Keys"
    )
    title = browser.find_element(By.ID, "label-title")
    wait(browser, lambda d: title.text == "Keys (3 images)", "the label shown")
    assert focused(browser, "data-label") == "Keys"
    second = browser.find_elements(By.CSS_SELECTOR, "figure.thumb")[1]
    second.find_element(By.TAG_NAME, "button").send_keys(Keys.ENTER)
    browser.switch_to.alert.accept()
    wait(browser, lambda d: title.text == "Keys (2 images)", "the image deleted")
    third = browser.find_elements(By.CSS_SELECTOR, "figure.thumb")[1].get_attribute("data-id")
    assert focused(browser, "aria-label") == f"delete image #{third}"


def test_a_recognised_label_added_elsewhere_is_listed_and_deleted(server, browser, tmp_path):
    """A result's label that another client added after the page listed the labels: choosing
    it lists it, and "Delete label" asks about its images (it failed: a TypeError)."""
    (photo,) = make_images(tmp_path / "fresh", 1, seed=23)
    open_page(browser, server)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        files = {"image": (photo.name, photo.read_bytes(), "image/png")}
        assert client.post("/v1/gallery/images", data={"label": "Fresh"}, files=files).is_success
    browser.find_element(By.ID, "photo").send_keys(str(photo))
    wait(browser, lambda d: "Fresh" in texts(d, "#results li button"), "recognised as Fresh")
    browser.execute_script(
        "[...document.querySelectorAll('#results li button')]"
        ".find((b) => b.textContent === 'Fresh').click()"
    )
    title = browser.find_element(By.ID, "label-title")
    wait(browser, lambda d: title.text == "Fresh (1 image)", "the label's images shown")
    assert label_button(browser, "Fresh").get_attribute("aria-current") == "true"
    browser.find_element(By.ID, "delete-label").click()
    alert = browser.switch_to.alert
    assert alert.text == 'Delete "Fresh" and its 1 image?'
    alert.accept()
    status = browser.find_element(By.ID, "label-status")
    wait(browser, lambda d: status.text == "deleted 1 image", "the label deleted")


# Last: it empties the gallery.
def test_one_image_is_one_image_and_an_empty_gallery_says_how_to_fill_it(
    serving_library, server, browser
):
    open_page(browser, server, key="")
    message = browser.find_element(By.ID, "message")
    wait(browser, lambda d: message.text, "the page asks for the key")
    assert message.text == (
        "this server needs the API key: enter it in the API key box at the top of the page"
    )
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        image = serving_library.queries()[0][0]
        files = {"image": ("single.jpg", image.read_bytes(), "image/jpeg")}
        assert client.post("/v1/gallery/images", data={"label": "Single"}, files=files).is_success
        open_page(browser, server)
        choose_label(browser, "Single")
        assert browser.find_element(By.ID, "label-title").text == "Single (1 image)"
        browser.find_element(By.ID, "delete-label").click()
        alert = browser.switch_to.alert
        assert alert.text == 'Delete "Single" and its 1 image?'  # how much goes
        alert.accept()
        status = browser.find_element(By.ID, "label-status")
        wait(browser, lambda d: status.text.startswith("deleted"), "label deleted")
        assert status.text == "deleted 1 image"
        title = browser.find_element(By.ID, "label-title")
        wait(browser, lambda d: title.text == "Choose a label", "no label chosen")
        assert focused(browser, "id") == "label-title"  # not lost with the hidden button
        for entry in client.get("/v1/gallery/labels").json()["labels"]:
            client.delete(f"/v1/gallery/labels/{entry['label']}").raise_for_status()
    open_page(browser, server)
    summary = browser.find_element(By.ID, "gallery-summary")
    wait(browser, lambda d: summary.text.startswith("0 images"), "the empty gallery loaded")
    assert browser.find_element(By.ID, "label-title").text == (
        "The gallery is empty: add images below"
    )
