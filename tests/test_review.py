"""The review pages of evaluate.py --html and predict.py --html, in a real headless Chromium."""
import contextlib
import csv
import io
import json
import os
import re
import shutil
import time

import numpy as np
import pytest
import yaml
from conftest import overrides
from PIL import Image

import config
import data
import evaluate
import predict
import review
from cli import UserError

CHARSET = "0123456789"
# Paths a page must show as text: were any of them markup, it would alert or set window.pwned. A folder
# named < puts "</script>" in a path, which would end the page's data early.
HOSTILE_NAMES = ["<img src=x onerror=alert(1)>.png", "<img src=x onerror=window.pwned=1>.png",
                 "<svg onload=window.pwned=2>.png", "<script>.png", "</script><img src=x onerror=window.pwned=3>.png",
                 "\"quoted\", & it's.png"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for the module, from the system's packages (.ci/run installs them)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # Without the background services off, Chromium stalls on a closed network.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
    yield driver
    driver.quit()


def find(browser, selector):
    return browser.find_elements("css selector", selector)


def percent(x):
    return f"{100 * x:.2f}%"


def shown_cards(browser):
    """What each card not filtered out shows, in page order, read in one call."""
    return browser.execute_script("""return [...document.querySelectorAll(".card:not([hidden])")].map(card => ({
        path: card.querySelector(".path").textContent,
        label: card.querySelector(".label .text")?.textContent ?? null,
        reading: card.querySelector(".reading .text").textContent,
        marked: [...card.querySelectorAll(".label mark")].map(mark => mark.textContent),
        confidence: Number(card.querySelector(".confidence").textContent.split(" ")[1]),
        box: card.querySelector("input.correction").value}))""")


def download_labels(browser, folder):
    """Clicks the download button -> the rows of the CSV the browser saved into folder."""
    folder.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
    find(browser, "#download")[0].click()
    deadline = time.monotonic() + 10
    # Chromium may show labels.csv a moment before it removes labels.csv.crdownload.
    while [p.name for p in folder.iterdir()] != ["labels.csv"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p.name for p in folder.iterdir()] == ["labels.csv"]  # one download, complete
    with open(folder / "labels.csv", encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    """The tiny run's held-out split (every reading wrong or nearly) -> (JSON report, review page)."""
    page = tmp_path_factory.mktemp("evaluated") / "review.html"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert evaluate.main(["--model", str(trained_run), "--json", "--html", str(page)]) == 0
    return json.loads(out.getvalue()), page


@pytest.fixture(scope="module")
def held_out(trained_run):
    """(data folder of the run, {path: label} of its held-out split)."""
    root = yaml.safe_load((trained_run / "config.yaml").read_text())["data"]["dir"]
    return root, data.read_labels_csv(trained_run / "test_split.csv", root)[0]


@pytest.fixture(scope="module")
def predicted(trained_run, digits, tmp_path_factory):
    """predict.py --html on captchas with hostile file names -> ({name: (reading, confidence)}, review page)."""
    work = tmp_path_factory.mktemp("predicted")
    folder = work / "captchas"
    (folder / "<").mkdir(parents=True)
    for name, source in zip(HOSTILE_NAMES + ["plain.png"], data.find_images(digits)):
        shutil.copy(source, folder / name)
    page, readings = work / "review.html", work / "read.csv"
    assert predict.main(["--model", str(trained_run), str(folder), "--output", str(readings), "--html", str(page)]) == 0
    with open(readings, encoding="utf-8") as f:
        read = {os.path.relpath(row["path"], folder): (row["prediction"], float(row["confidence"]))
                for row in csv.DictReader(f)}
    return read, page


def test_evaluate_page_shows_the_reports_figures(browser, evaluated):
    report, page = evaluated
    browser.get(page.as_uri())
    assert find(browser, "#whole-string-accuracy")[0].text == percent(report["whole_string_accuracy"])
    assert [td.text for td in find(browser, "#per-position td")] == [
        percent(a) for a in report["per_position_accuracy"]]
    assert [li.text for li in find(browser, "#confusions li")] == [
        f"{c['true']} \u2192 {c['predicted']} \u00d7{c['count']}" for c in report["confusions"]]
    assert [t.text for t in find(browser, "#coverage .accuracy")] == [
        percent(c["whole_string_accuracy"]) for c in report["coverage"]]
    counts = [int(n) for n in re.findall(r"\d+", find(browser, "#counts")[0].text)]
    assert counts == [report["correct"], report["count"], report["errors"], report["suspected_label_errors"]["count"],
                      report["skipped"]]


def test_evaluate_page_has_one_card_per_error_most_confident_first(browser, evaluated, held_out):
    report, page = evaluated
    _, labels = held_out
    browser.get(page.as_uri())
    cards = shown_cards(browser)
    assert len(cards) == report["errors"] > 0
    for card in cards:
        assert card["label"] == labels[card["path"]] != card["reading"]
        assert card["marked"] == [a for a, b in zip(card["label"], card["reading"]) if a != b]
        assert card["box"] == card["label"]
    confidences = [card["confidence"] for card in cards]
    assert confidences == sorted(confidences, reverse=True)


def test_corrections_download_as_a_labels_csv_that_train_reads(browser, evaluated, held_out, cache_dir, tmp_path):
    from selenium.webdriver.common.keys import Keys

    _, page = evaluated
    root, labels = held_out
    browser.get(page.as_uri())
    cards = shown_cards(browser)
    paths, reading = [card["path"] for card in cards], cards[0]["reading"]
    boxes = find(browser, "input.correction")
    boxes[0].send_keys(Keys.BACKSPACE * 4, reading, Keys.ENTER)  # the model is right: its reading becomes the label
    assert browser.switch_to.active_element == boxes[1]
    boxes[1].send_keys(Keys.BACKSPACE * 4, Keys.TAB)  # emptied: the image is left out
    assert browser.switch_to.active_element == boxes[2]
    fixed = "0000" if labels[paths[2]] != "0000" else "1111"
    boxes[2].send_keys(Keys.BACKSPACE * 4, fixed[:2])
    find(browser, "#download")[0].click()
    assert "length 2, not 4" in find(browser, "#status")[0].text  # refused: train.py would stop on it
    boxes[2].send_keys(fixed[2:])
    assert find(browser, "#corrections")[0].text == "3 corrected"

    rows = download_labels(browser, tmp_path / "downloads")
    expected = {**labels, paths[0]: reading, paths[2]: fixed}
    del expected[paths[1]]
    assert rows[0] == ["filename", "label"] and dict(rows[1:]) == expected and len(rows) == len(expected) + 1
    cfg = config.load_config(None, overrides(f"data.dir={root}", f"data.labels={tmp_path / 'downloads/labels.csv'}",
                                             f"data.charset={CHARSET}", cache_dir=cache_dir))
    dataset = data.load_dataset(cfg)
    assert {data.shown_path(path, root): label for path, label in dataset["items"]} == expected


def test_predict_page_lists_readings_least_confident_first_to_correct(browser, predicted):
    read, page = predicted
    browser.get(page.as_uri())
    cards = shown_cards(browser)
    assert sorted(card["path"] for card in cards) == sorted(read)
    assert all(card["label"] is None and card["box"] == card["reading"] == read[card["path"]][0] for card in cards)
    shown = [card["confidence"] for card in cards]  # rounded to 4 places, the CSV's to 6: compared within 1e-4
    assert shown == sorted(shown) and np.allclose(shown, sorted(c for _, c in read.values()), rtol=0, atol=1e-4)
    assert not find(browser, "#figures:not([hidden])")


def test_file_names_show_as_text_and_run_nothing(browser, predicted, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException

    read, page = predicted
    browser.get(page.as_uri())
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert
    assert browser.execute_script("return window.pwned") is None
    assert not find(browser, "[onerror], [onload], img[src='x']") and len(find(browser, "script")) == 2
    assert {path.text for path in find(browser, ".card .path")} == set(read)  # as shown on screen
    rows = download_labels(browser, tmp_path / "downloads")
    assert dict(rows[1:]) == {name: reading for name, (reading, _) in read.items()}


def test_filter_and_enter_move_through_the_shown_cards_only(browser, digits, tmp_path):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    confidences = {"a.png": 0.99, "c.png": 0.6, "b.png": 0.95, "d.png": 0.3}  # each filter skips a card
    for name, source in zip(confidences, data.find_images(digits)):
        shutil.copy(source, tmp_path / name)
    cards = [{"path": name, "label": "1234", "reading": "1235", "confidence": confidence,
              "suspected": confidence >= 0.9, "reason": None} for name, confidence in confidences.items()]
    review.write_page(tmp_path / "page.html", "hand-made", "model", tmp_path, cards,
                      [(name, "1234") for name in confidences], {"charset": CHARSET, "length": 4})
    browser.get((tmp_path / "page.html").as_uri())
    assert [card["path"] for card in shown_cards(browser)] == list(confidences)
    for choice, expected in (("suspected", ["a.png", "b.png"]), ("unsure", ["c.png", "d.png"])):
        Select(find(browser, "#filter")[0]).select_by_value(choice)
        assert [card["path"] for card in shown_cards(browser)] == expected
        first, second = (box for box in find(browser, "input.correction") if box.is_displayed())
        first.send_keys(Keys.ENTER)
        assert browser.switch_to.active_element == second
        second.send_keys(Keys.SHIFT, Keys.TAB)
        assert browser.switch_to.active_element == first


def test_page_renders_its_cards_on_screen(browser, evaluated):
    _, page = evaluated
    browser.get(page.as_uri())
    card = find(browser, ".card")[0]
    browser.execute_script("arguments[0].scrollIntoView()", card)
    time.sleep(0.5)  # the image is given its source as the card nears the screen
    shot = Image.open(io.BytesIO(card.screenshot_as_png)).convert("RGB")
    colours = shot.getcolors(maxcolors=1 << 16) or []
    assert len(colours) > 50  # a captcha, drawn with its noise, and text: not a blank box
    white = sum(n for n, rgb in colours if min(rgb) > 245)
    assert white < 0.7 * shot.width * shot.height


def test_ten_thousand_cards_open_without_loading_every_image(browser, tmp_path):
    Image.new("RGB", (16, 8), "teal").save(tmp_path / "one.png")
    cards = []
    for i in range(10_000):
        os.link(tmp_path / "one.png", tmp_path / f"{i:05d}.png")
        cards.append({"path": f"{i:05d}.png", "label": None, "reading": "1234", "confidence": i / 10_000,
                      "suspected": False, "reason": None})
    review.write_page(tmp_path / "page.html", "many", "model", tmp_path, cards,
                      [(card["path"], "1234") for card in cards], {"charset": CHARSET, "length": 4})
    start = time.monotonic()
    browser.get((tmp_path / "page.html").as_uri())
    count = 'return [document.querySelectorAll(".card").length, document.querySelectorAll("img[src]").length]'
    while (counts := browser.execute_script(count))[0] < 10_000:
        assert time.monotonic() - start < 30, f"{counts[0]} of 10,000 cards shown after 30 s"
        time.sleep(0.1)
    assert counts[1] < 200  # images load as their cards scroll into view
    middle = browser.execute_script('const img = document.querySelectorAll(".card img")[5000]; '
                                    'img.scrollIntoView(); return img')
    deadline = time.monotonic() + 10
    while not browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", middle):
        assert time.monotonic() < deadline, "a card scrolled to never showed its image"
        time.sleep(0.1)


def test_a_page_that_cannot_be_written_is_one_line_before_the_model_loads(tmp_path):
    no_model = tmp_path / "no_model"
    with pytest.raises(UserError, match="there is no folder"):
        evaluate.main(["--model", str(no_model), "--html", str(tmp_path / "missing" / "review.html")])
    (tmp_path / "review.html").write_text("precious")
    for script in (evaluate, predict):
        with pytest.raises(UserError, match="exists; pass --overwrite"):
            script.main(["--model", str(no_model), *([str(tmp_path)] if script is predict else []),
                         "--html", str(tmp_path / "review.html")])
    assert (tmp_path / "review.html").read_text() == "precious"


def test_every_row_of_the_label_file_is_on_the_page_and_in_its_download(browser, trained_run, digits, tmp_path):
    """Rows that cannot be scored (a missing file, a label of the wrong length or with an unknown
    character) are the ones to fix: each keeps its card, marked with why, and its row in the download."""
    from selenium.webdriver.support.ui import Select

    folder = tmp_path / "captchas"
    folder.mkdir()
    sources = data.find_images(digits)[:7]
    for source in sources:
        shutil.copy(source, folder / source.name)
    rows = [[source.name, source.name[:4]] for source in sources[:6]]
    rows += [["missing.png", "1234"], [sources[6].name, "12345"], [sources[6].name.replace(".png", "b.png"), "12a4"],
             [sources[0].name.replace(".png", "c.png"), "99"]]
    for name in (rows[8][0], rows[9][0]):
        shutil.copy(sources[6], folder / name)
    (tmp_path / "labels.csv").write_text("\n".join(",".join(row) for row in rows) + "\n")
    page = tmp_path / "review.html"
    assert evaluate.main(["--model", str(trained_run), "--data", str(folder), "--labels", str(tmp_path / "labels.csv"),
                          "--html", str(page)]) == 0
    browser.get(page.as_uri())
    Select(find(browser, "#filter")[0]).select_by_value("unscored")
    unscored = {card["path"]: card["box"] for card in browser.execute_script(
        """return [...document.querySelectorAll(".card:not([hidden])")].map(card => ({
            path: card.querySelector(".path").textContent, box: card.querySelector("input.correction").value,
            why: card.querySelector(".reason").textContent}))""")}
    assert unscored == {"missing.png": "1234", sources[6].name: "12345", rows[8][0]: "12a4", rows[9][0]: "99"}
    for name, label in (("12345", "1234"), ("12a4", "1244"), ("99", "9999")):
        box = next(b for b in find(browser, "input.correction") if b.is_displayed() and b.get_attribute("value") == name)
        box.clear()
        box.send_keys(label)
    saved = download_labels(browser, tmp_path / "download")
    assert len(saved) == 1 + len(rows)  # a header, then every row, the missing file's too
    assert dict(saved[1:])["missing.png"] == "1234" and dict(saved[1:])[rows[8][0]] == "1244"
