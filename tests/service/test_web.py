"""The web page (pipeline/service/web/) in a real browser, against the real service.

``moodstream serve`` runs as a process (ONNX scorer, SQLite catalog in a temporary folder,
10-s timeline segments) and headless Chromium drives the page through Selenium: it uploads a
real clip, checks what the result view shows against the record the page received, lays the page
out at a phone's width, ranks the catalog by a mood and opens a track from it, and uploads a file
that is not audio. Screenshots of each view are written to the test's tmp_path.

Then hostile values, against a second service with auth on that follows a real broker's output
topic (the embedded stack's Tansu): a record whose track id, mood family, tags and correlation
id are markup (``<img onerror>``, ``<script>``, ``<svg onload>``) is announced on the topic, and
a real clip is uploaded under a file name that is markup. The page, given its token in its
address, shows them and the test proves nothing ran: the payloads' flag is unset, no element of
theirs exists, and the browser reported no Content-Security-Policy violation (any markup that got
in would have tried to run and been blocked). Markup put into the page behind its back is
blocked by the CSP, and without a token the page shows the service's 401.

Needs the clips of ``make clips`` in MOODSTREAM_TEST_CLIPS, and Chromium with its chromedriver
on PATH (Debian's chromium and chromium-driver, which ``make tools`` installs).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import requests
from aiokafka import AIOKafkaProducer
from identity import IdentityProvider
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait
from serving import ServiceProcess
from support import real_clip

from devstack import EmbeddedStack
from pipeline.service.catalog import CatalogStore
from pipeline.service.uploads import RETRY_AFTER_S

pytestmark = pytest.mark.integration

CLIP = "drascula-track1-100s.ogg"  # a 30-s excerpt: three 10-s timeline segments
ANALYSIS_TIMEOUT_S = 120
VIEW_TIMEOUT_S = 20
DESKTOP = (1280, 1000)
PHONE = (390, 844)
#: Where the page's quadrants lie on the (valence, arousal) plane: the signs of both axes.
QUADRANT_SIGNS = {"happy": (1, 1), "angry": (-1, 1), "sad": (-1, -1), "relaxed": (1, -1)}


@pytest.fixture(scope="module")
def clip() -> Path:
    return real_clip(CLIP)


@pytest.fixture(scope="module")
def service(tmp_path_factory, clip) -> Iterator[ServiceProcess]:
    try:
        with ServiceProcess(
            tmp_path_factory.mktemp("web"), ready_timeout_s=120, MOODSTREAM_TIMELINE_SEGMENT_S="10"
        ) as running:
            yield running
    except RuntimeError as exc:  # it exited or never became ready: the message has its log tail
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.fail("the browser test needs Debian's chromium and chromium-driver; `make tools` installs them")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    driver.set_window_size(*DESKTOP)
    # Before any page script: record every Content-Security-Policy violation the page reports.
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH_CSP})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def catalog(service, clip) -> list[dict[str, Any]]:
    """The clip's record (as an upload gets it) and a twin with opposite moods, stored in the
    catalog the service reads."""
    with clip.open("rb") as f:
        answer = requests.post(service.url + "/v1/analyses", files={"file": (clip.name, f)}, timeout=ANALYSIS_TIMEOUT_S)
    assert answer.status_code == 200, answer.text
    record = answer.json()
    twin = opposite(record, "twin-of-" + record["track_id"])
    store = CatalogStore.open(service.catalog_url)
    try:
        for each in (record, twin):
            store.upsert(each)
    finally:
        store.close()
    return [record, twin]


# --- the tests ------------------------------------------------------------------------------------


def test_upload_shows_the_record(browser, service, clip, tmp_path):
    browser.get(service.url + "/")
    upload(browser, clip)
    wait_for_result(browser, ANALYSIS_TIMEOUT_S)
    assert "Analysed" in text(browser, "status")
    record = shown_record(browser)
    assert text(browser, "result-title") == record["track_id"]  # an upload has no title
    assert record["track_id"].startswith("upload-")

    leading = record["leading_mood"]
    assert text(browser, "leading-mood") == leading["mood"]
    assert f"{round(leading['confidence'] * 100)} %" in text(browser, "leading-confidence")
    assert browser.find_element(By.ID, "leading-unclear").is_displayed() == (not leading["clear"])

    bars = browser.find_elements(By.CSS_SELECTOR, "#mood-bars .mood-bar")
    assert len(bars) == len(record["moods"])
    shown = [bar.get_attribute("data-mood") for bar in bars]
    assert sorted(shown) == sorted(record["moods"])
    assert shown[0] == max(record["moods"], key=record["moods"].get)  # highest first
    for bar in bars:
        score = record["moods"][bar.get_attribute("data-mood")]
        assert bar.get_attribute("role") == "meter"
        assert float(bar.get_attribute("aria-valuenow")) == pytest.approx(score, abs=1e-6)
        assert fill_share(browser, bar) == pytest.approx(score, abs=0.01)

    for network, ranked in record["top_tags"].items():
        tag_bars = browser.find_elements(By.CSS_SELECTOR, f'.tag-bar[data-network="{network}"]')
        assert [b.get_attribute("data-tag") for b in tag_bars] == [t["tag"] for t in ranked]
        for bar, tag in zip(tag_bars, ranked):
            assert fill_share(browser, bar) == pytest.approx(tag["score"], abs=0.01)

    assert len(record["timeline"]) == 3
    assert len(browser.find_elements(By.CSS_SELECTOR, "#timeline-table tbody tr")) == 3
    legend = [s.text for s in browser.find_elements(By.CSS_SELECTOR, "#timeline-chart .u-legend .u-series .u-label")]
    assert legend[1:] == shown  # the x series, then one line per family
    pixels = chart_pixels(browser)
    assert pixels["opaque"] > 0.01 * pixels["total"], pixels
    assert pixels["coloured"] > 1000, pixels  # the families' lines, not only axes and grid

    assert_point_in_quadrant(browser, record)
    assert record["quadrant"] in text(browser, "va-text")

    quadrant_bars = browser.find_elements(By.CSS_SELECTOR, "#quadrant-bars .quadrant-bar")
    probabilities = record["quadrant_probabilities"]
    assert [b.get_attribute("data-quadrant") for b in quadrant_bars] == (
        ["happy", "angry", "sad", "relaxed"] if probabilities else []
    )
    for bar in quadrant_bars:
        assert fill_share(browser, bar) == pytest.approx(probabilities[bar.get_attribute("data-quadrant")], abs=0.01)
    features = record["audio_features"]
    facts = text(browser, "features-list")
    assert f"{features['loudness']:.1f} LUFS" in facts and f"{len(features['beats'])} (" in facts
    assert (f"{features['tempo']:.1f} BPM" if features["tempo"] else "no pulse") in facts
    assert {b.get_attribute("data-feature") for b in browser.find_elements(By.CSS_SELECTOR, ".feature-bar")} >= {
        "energy",
        "danceability",
        "valence",
    }
    # The upload plays from the page's own copy, and the timeline's playhead follows it.
    player = browser.find_element(By.ID, "player")
    assert player.is_displayed() and player.get_attribute("src").startswith("blob:")
    browser.execute_script(
        "const p = document.getElementById('player'); p.currentTime = 20; p.dispatchEvent(new Event('seeked'));"
    )
    playhead = browser.execute_script(
        "const h = document.querySelector('#timeline-chart .playhead'); const u = h.parentElement.getBoundingClientRect();"
        " return {hidden: h.hidden, x: h.getBoundingClientRect().left + 1 - u.left, width: u.width};"
    )
    assert not playhead["hidden"]
    assert playhead["x"] == pytest.approx(playhead["width"] * 20 / max(record["duration_s"], 30.0), abs=3), playhead

    screenshot(browser, tmp_path / "upload.png")


def test_phone_layout_has_no_horizontal_scrolling(browser, service, catalog, tmp_path):
    record = catalog[0]
    browser.set_window_size(*PHONE)
    try:
        browser.get("about:blank")  # a fresh page laid out at the phone's width from the start
        browser.get(f"{service.url}/#{urlencode({'track': record['track_id']})}")
        wait_for_result(browser, VIEW_TIMEOUT_S, record["track_id"])
        assert text(browser, "leading-mood") == record["leading_mood"]["mood"]
        # clientWidth, not innerWidth: desktop Chromium's scrollbar takes its width from the
        # window (a phone's overlays the page), so the page must fit in what is left.
        widths = browser.execute_script(
            "return {scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth,"
            " chart: document.querySelector('#timeline-chart canvas').getBoundingClientRect().right}"
        )
        assert widths["scroll"] <= widths["client"], widths
        assert widths["chart"] <= widths["client"], widths
        assert chart_pixels(browser)["coloured"] > 500
        screenshot(browser, tmp_path / "phone.png")
    finally:
        browser.set_window_size(*DESKTOP)


def test_catalog_ranks_by_mood_and_opens_a_track(browser, service, catalog, tmp_path):
    uploaded, twin = catalog
    # The mood the twin leads in: the ranking puts it first, so opening it changes the view.
    mood = twin["leading_mood"]["mood"]
    expected = sorted(catalog, key=lambda r: -r["moods"][mood])
    assert expected[0] is twin
    wait_until_similar(service, twin["track_id"], uploaded["track_id"])

    browser.get(service.url + "/")
    # The page opens on the catalog's newest tracks, before any mood is chosen.
    newest = WebDriverWait(browser, VIEW_TIMEOUT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#catalog-list .track-row")
    )
    assert {r.get_attribute("data-track-id") for r in newest} == {r["track_id"] for r in catalog}
    assert "newest first" in text(browser, "catalog-status")
    select = WebDriverWait(browser, VIEW_TIMEOUT_S).until(
        lambda d: (s := d.find_element(By.ID, "mood-select")).is_enabled() and s
    )
    assert mood in [o.get_attribute("value") for o in Select(select).options]
    Select(select).select_by_value(mood)
    rows = WebDriverWait(browser, VIEW_TIMEOUT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#catalog-list .track-row")
    )
    assert [r.get_attribute("data-track-id") for r in rows] == [r["track_id"] for r in expected]
    for row, record in zip(rows, expected):
        assert f"{mood} {record['moods'][mood]:.2f}" in row.text

    rows[0].click()
    wait_for_result(browser, VIEW_TIMEOUT_S, twin["track_id"])
    assert text(browser, "leading-mood") == mood
    assert shown_record(browser) == twin
    assert rows[0].get_attribute("aria-current") == "true"
    assert_point_in_quadrant(browser, twin)
    similar = WebDriverWait(browser, VIEW_TIMEOUT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#similar-list .track-row")
    )
    assert [s.get_attribute("data-track-id") for s in similar] == [uploaded["track_id"]]
    screenshot(browser, tmp_path / "catalog.png")


def test_a_file_that_is_not_audio_shows_the_problem(browser, service, tmp_path):
    fake = tmp_path / "notes.mp3"
    fake.write_text("these are notes, not music\n" * 20)
    with fake.open("rb") as f:
        answer = requests.post(service.url + "/v1/analyses", files={"file": (fake.name, f)}, timeout=60)
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    problem = answer.json()

    browser.get(service.url + "/")
    upload(browser, fake)
    WebDriverWait(browser, ANALYSIS_TIMEOUT_S).until(lambda d: d.find_element(By.ID, "problem").is_displayed())
    assert text(browser, "problem-reason") == problem["reason"] == "undecodable"
    assert text(browser, "problem-title") == problem["title"]
    assert text(browser, "problem-detail") == problem["detail"]
    assert f"HTTP {answer.status_code}" in text(browser, "problem-status")
    assert not browser.find_element(By.ID, "result").is_displayed()
    assert "could not be analysed" in text(browser, "status")
    screenshot(browser, tmp_path / "problem.png")


def test_a_busy_service_says_when_to_try_again(browser, service, clip, tmp_path):
    # The service takes one analysis at a time (ServiceProcess): an upload whose body is still
    # arriving holds that slot, so the page's upload is refused with 503 and Retry-After.
    go_on = threading.Event()

    def slow_body():
        data = clip.read_bytes()
        yield data[:1024]
        go_on.wait(timeout=ANALYSIS_TIMEOUT_S)
        yield data[1024:]

    holder = threading.Thread(
        target=requests.post,
        args=(service.url + "/v1/analyses",),
        kwargs={
            "data": slow_body(),
            "headers": {"Content-Type": "application/octet-stream"},
            "timeout": ANALYSIS_TIMEOUT_S,
        },
    )
    holder.start()
    try:
        deadline = time.monotonic() + VIEW_TIMEOUT_S
        while service.metric("moodstream_analyses_in_flight") < 1:
            assert time.monotonic() < deadline, "the slow upload never took the analysis slot"
            time.sleep(0.2)
        browser.get(service.url + "/")
        upload(browser, clip)
        WebDriverWait(browser, VIEW_TIMEOUT_S).until(lambda d: d.find_element(By.ID, "problem").is_displayed())
        assert text(browser, "problem-reason") == "busy"
        assert "HTTP 503" in text(browser, "problem-status")
        assert text(browser, "problem-retry") == f"The service is busy, try again in {RETRY_AFTER_S} s."
        assert not browser.find_element(By.ID, "result").is_displayed()
        screenshot(browser, tmp_path / "busy.png")
    finally:
        go_on.set()
        holder.join(timeout=ANALYSIS_TIMEOUT_S)


# --- hostile values: shown as text, never run --------------------------------------------------------

#: What a hostile producer or uploader sends; each payload would set window.__xss if it ran.
MARKUP = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
HOSTILE_ID = 'label/<img src=x onerror="window.__xss=3">/<svg onload="window.__xss=4">"\'&amp;'
HOSTILE_FILE = "<img src=x onerror=window.__xss=5><svg onload=window.__xss=6>.ogg"
WATCH_CSP = """
window.__violations = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__violations.push(e.violatedDirective + ' ' + (e.blockedURI || e.sample || '')));
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[EmbeddedStack]:
    """A real Kafka-protocol broker (Tansu, and moto beside it; no Triton)."""
    with EmbeddedStack(model_repository=None, log_dir=tmp_path_factory.mktemp("broker")) as stack:
        stack.create_topics(["xss.moods"])
        yield stack


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, broker) -> Iterator[tuple[ServiceProcess, IdentityProvider]]:
    """The service with auth on, its catalog following the broker's xss.moods."""
    folder = tmp_path_factory.mktemp("guarded")
    idp = IdentityProvider(folder)
    try:
        with ServiceProcess(
            folder,
            ready_timeout_s=120,
            **broker.env(),
            **idp.settings(),
            MOODSTREAM_OUTPUT_TOPIC="xss.moods",
            MOODSTREAM_CATALOG_FOLLOW="true",
            MOODSTREAM_CATALOG_GROUP="xss-catalog",
        ) as running:
            yield running, idp
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def hostile(guarded, broker, clip) -> dict[str, Any]:
    """A real record made hostile, announced on the output topic and taken in by the catalog."""
    service, idp = guarded
    with clip.open("rb") as f:
        answer = requests.post(
            service.url + "/v1/analyses",
            files={"file": (clip.name, f)},
            headers=bearer(idp, "moods:analyse"),
            timeout=ANALYSIS_TIMEOUT_S,
        )
    assert answer.status_code == 200, answer.text
    record = answer.json()
    record["track_id"] = HOSTILE_ID
    record["correlation_id"] = MARKUP
    record["title"] = "<b>bold</b>" + MARKUP
    record["artist"] = MARKUP
    lead = record["leading_mood"]["mood"]
    record["moods"][MARKUP] = record["moods"].pop(lead)  # a mood family named with markup
    record["leading_mood"]["mood"] = MARKUP
    for ranked in record["top_tags"].values():
        ranked[0]["tag"] = MARKUP

    async def announce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait("xss.moods", json.dumps(record).encode(), key=HOSTILE_ID.encode())
        finally:
            await producer.stop()

    asyncio.run(announce())
    path = "/v1/tracks/" + quote(HOSTILE_ID, safe="/")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stored = requests.get(service.url + path, headers=bearer(idp, "moods:read"), timeout=10)
        if stored.status_code == 200:
            assert stored.json() == record
            return record
        time.sleep(0.5)
    pytest.fail(f"the catalog did not take in the announced record: {stored.status_code} {service.log_tail()}")


def test_markup_in_an_announced_record_is_shown_as_text(browser, guarded, hostile, tmp_path):
    service, idp = guarded
    token = idp.token(scope="moods:read")
    browser.get("about:blank")
    browser.get(f"{service.url}/#{urlencode({'access_token': token, 'track': HOSTILE_ID})}")
    wait_for_result(browser, VIEW_TIMEOUT_S, HOSTILE_ID)
    assert "access_token" not in browser.current_url  # taken out of the address and history
    assert text(browser, "result-title") == hostile["title"]
    assert text(browser, "result-artist") == MARKUP
    assert text(browser, "result-track") == f"({HOSTILE_ID})"
    assert text(browser, "leading-mood") == MARKUP
    assert shown_record(browser) == hostile
    labels = [b.get_attribute("data-mood") for b in browser.find_elements(By.CSS_SELECTOR, "#mood-bars .mood-bar")]
    assert MARKUP in labels
    legend = [s.text for s in browser.find_elements(By.CSS_SELECTOR, "#timeline-chart .u-legend .u-label")]
    assert MARKUP in legend
    tags = [b.get_attribute("data-tag") for b in browser.find_elements(By.CSS_SELECTOR, ".tag-bar")]
    assert MARKUP in tags
    # The catalog lists it as text too (ranked by a mood it still has a score for).
    mood = next(m for m in hostile["moods"] if m != MARKUP)
    Select(browser.find_element(By.ID, "mood-select")).select_by_value(mood)
    rows = WebDriverWait(browser, VIEW_TIMEOUT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#catalog-list .track-row")
    )
    assert f"{hostile['title']} — {MARKUP}" in [r.find_element(By.CSS_SELECTOR, ".track-id").text for r in rows]
    assert_nothing_ran(browser)
    screenshot(browser, tmp_path / "hostile-record.png")


def test_an_upload_named_with_markup_shows_its_name_as_text(browser, guarded, clip, tmp_path):
    service, idp = guarded
    named = tmp_path / HOSTILE_FILE
    shutil.copyfile(clip, named)
    browser.get("about:blank")
    browser.get(f"{service.url}/#{urlencode({'access_token': idp.token(scope='moods:read moods:analyse')})}")
    upload(browser, named)
    wait_for_result(browser, ANALYSIS_TIMEOUT_S)
    assert text(browser, "status").startswith(f"Analysed {HOSTILE_FILE} in ")
    assert_nothing_ran(browser)
    screenshot(browser, tmp_path / "hostile-upload.png")


def test_markup_put_into_the_page_behind_its_back_is_blocked_by_the_csp(browser, guarded):
    """Defence in depth: were a value ever written as HTML, its inline handler or script would
    still not run."""
    service, _ = guarded
    browser.get("about:blank")
    browser.get(service.url + "/")
    browser.execute_script(
        "const box = document.createElement('div');"
        ' box.innerHTML = \'<img src="/static/no-such.png" onerror="window.__xss=7">\';'
        " document.body.append(box);"
        " const s = document.createElement('script'); s.textContent = 'window.__xss = 8'; document.body.append(s);"
    )
    WebDriverWait(browser, VIEW_TIMEOUT_S).until(lambda d: len(d.execute_script("return window.__violations")) >= 2)
    assert browser.execute_script("return window.__xss") is None
    violations = browser.execute_script("return window.__violations")
    assert all(v.startswith("script-src") for v in violations), violations


def test_without_a_token_the_page_shows_the_services_401(browser, guarded, clip, tmp_path):
    service, _ = guarded
    browser.get(service.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get("about:blank")
    browser.get(service.url + "/")
    WebDriverWait(browser, VIEW_TIMEOUT_S).until(lambda d: "Authentication required" in text(d, "catalog-status"))
    upload(browser, clip)
    WebDriverWait(browser, VIEW_TIMEOUT_S).until(lambda d: d.find_element(By.ID, "problem").is_displayed())
    assert text(browser, "problem-reason") == "unauthenticated"
    assert "HTTP 401" in text(browser, "problem-status")
    screenshot(browser, tmp_path / "unauthenticated.png")


def assert_nothing_ran(browser: WebDriver) -> None:
    """No payload ran, none of their elements exists, no CSP violation was reported."""
    found = browser.execute_script("""
        const handlers = [...document.querySelectorAll('*')].filter(
          (e) => [...e.attributes].some((a) => a.name.startsWith('on')));
        return {xss: window.__xss ?? null, violations: window.__violations,
                scripts: document.scripts.length, images: document.images.length,
                svgs: document.querySelectorAll('svg').length, handlers: handlers.length};""")
    assert found == {"xss": None, "violations": [], "scripts": 1, "images": 0, "svgs": 1, "handlers": 0}, found


def bearer(idp: IdentityProvider, scope: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {idp.token(scope=scope)}"}


# --- helpers ----------------------------------------------------------------------------------------


def upload(browser: WebDriver, path: Path) -> None:
    browser.find_element(By.ID, "upload-file").send_keys(str(path))
    browser.find_element(By.ID, "upload-submit").click()


def wait_for_result(browser: WebDriver, timeout_s: float, track_id: str | None = None) -> None:
    """Until the result view shows (``track_id``, when given); a problem the page shows instead
    fails at once with its text."""

    def settled(d: WebDriver) -> bool:
        if d.find_element(By.ID, "problem").is_displayed():
            pytest.fail(f"the page shows a problem: {d.find_element(By.ID, 'problem').text}")
        result = d.find_element(By.ID, "result")
        shown = result.get_attribute("data-track-id")
        return result.is_displayed() and shown is not None and track_id in (None, shown)

    WebDriverWait(browser, timeout_s).until(settled, message=f"no result view after {timeout_s} s")


def shown_record(browser: WebDriver) -> dict[str, Any]:
    # textContent: the <pre> sits in a closed <details>, and Selenium's .text is what is visible.
    return json.loads(browser.execute_script("return document.getElementById('record-json').textContent"))


def text(browser: WebDriver, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def fill_share(browser: WebDriver, bar) -> float:
    """How much of its bar's width the coloured fill takes, as laid out."""
    return browser.execute_script(
        "const f = arguments[0].querySelector('.bar-fill');"
        " return f.getBoundingClientRect().width / arguments[0].getBoundingClientRect().width;",
        bar,
    )


def chart_pixels(browser: WebDriver) -> dict[str, int]:
    """Pixels of the timeline's canvas: all, drawn (alpha > 0), and saturated colour (the mood
    lines; axes, labels and grid are grey)."""
    return browser.execute_script("""
        const canvas = document.querySelector('#timeline-chart canvas');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let opaque = 0, coloured = 0;
        for (let i = 0; i < data.length; i += 4) {
          if (data[i + 3] > 0) opaque++;
          const hi = Math.max(data[i], data[i + 1], data[i + 2]), lo = Math.min(data[i], data[i + 1], data[i + 2]);
          if (data[i + 3] > 200 && hi - lo > 80) coloured++;
        }
        return {total: canvas.width * canvas.height, opaque, coloured};""")


def assert_point_in_quadrant(browser: WebDriver, record: dict[str, Any]) -> None:
    """The point lies inside the plane, on the sides of both axes its valence and arousal say."""
    box = browser.execute_script(
        "const p = document.querySelector('#va-plane .va-point').getBoundingClientRect(),"
        " r = document.getElementById('va-plane').getBoundingClientRect();"
        " return {x: p.x + p.width / 2, y: p.y + p.height / 2, left: r.left, right: r.right, top: r.top, bottom: r.bottom};"
    )
    assert box["left"] < box["x"] < box["right"] and box["top"] < box["y"] < box["bottom"], box
    x = (box["x"] - (box["left"] + box["right"]) / 2) / ((box["right"] - box["left"]) / 2)  # valence, as drawn
    y = ((box["top"] + box["bottom"]) / 2 - box["y"]) / (
        (box["bottom"] - box["top"]) / 2
    )  # arousal (screen y points down)
    # The plane leaves a margin: ±1 sits at 90 % of the half-width.
    assert x == pytest.approx(0.9 * record["valence"], abs=0.03), box
    assert y == pytest.approx(0.9 * record["arousal"], abs=0.03), box
    # Heads' valence and arousal are expectations over the four quadrant probabilities, so two
    # close quadrants can put the point on the far side of an axis from the most probable one;
    # from tags, the quadrant is the point's own.
    if record["mood_source"] != "heads":
        signs = QUADRANT_SIGNS[record["quadrant"]]
        assert (x > 0, y > 0) == (signs[0] > 0, signs[1] > 0), (record["quadrant"], box)


def opposite(record: dict[str, Any], track_id: str) -> dict[str, Any]:
    """A copy of ``record`` as another track whose every family scores 1 - the original's."""
    twin = copy.deepcopy(record)
    twin["track_id"] = track_id
    twin["moods"] = {m: round(1 - s, 6) for m, s in record["moods"].items()}
    ranked = sorted(twin["moods"].items(), key=lambda kv: -kv[1])
    present = [{"mood": m, "score": s} for m, s in ranked if s >= 0.7]
    twin["top_moods"] = present
    twin["leading_mood"] = {"mood": ranked[0][0], "confidence": ranked[0][1], "clear": bool(present)}
    twin["valence"], twin["arousal"] = -record["valence"], -record["arousal"]
    twin["quadrant"] = {"happy": "sad", "sad": "happy", "angry": "relaxed", "relaxed": "angry"}[record["quadrant"]]
    return twin


def wait_until_similar(service: ServiceProcess, track_id: str, other: str, timeout_s: float = 30) -> None:
    """Until the service's neighbour index (which catches up on the catalog every few seconds)
    lists ``other`` next to ``track_id``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = requests.get(f"{service.url}/v1/tracks/{track_id}/similar", params={"limit": 10}, timeout=10)
        if answer.status_code == 200 and other in [s["track_id"] for s in answer.json()["similar"]]:
            return
        time.sleep(0.5)
    pytest.fail(
        f"/v1/tracks/{track_id}/similar did not list {other} within {timeout_s} s: {answer.status_code} {answer.text[:300]}"
    )


def screenshot(browser: WebDriver, path: Path) -> None:
    """The whole page (not only the window's part of it), through the DevTools protocol."""
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
