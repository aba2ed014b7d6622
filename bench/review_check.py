"""The review page on a real run with noisy labels, in headless Chromium: evaluate.py --html against
the published labels; the suspected label errors are corrected in the page's boxes, the labels CSV is
downloaded with its button, and that CSV is compared with the clean labels.

    python bench/review_check.py --model RUN --labels PUBLISHED.csv --clean CLEAN.csv --out DIR

The corrections are typed from CLEAN.csv, standing in for a person who reads each card's image.
Writes DIR/review.html, DIR/review.png (the page, filtered to suspected label errors), DIR/labels.csv
(the download) and DIR/summary.json. Needs Chromium and chromedriver (see tests/test_review.py).
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import atomic  # noqa: E402
import data  # noqa: E402
from bench import held_out  # noqa: E402


def chromium(downloads):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--window-size=1280,1000", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("--model", "--labels", "--clean", "--out"):
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    page, downloads = args.out / "review.html", args.out / "download"
    report = json.loads(subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--model", str(args.model), "--labels", str(args.labels),
         "--html", str(page), "--json", "--overwrite"], capture_output=True, text=True, check=True).stdout)
    root, published = held_out(args.model, args.labels)
    _, clean = held_out(args.model, args.clean)
    wrong = {name for name in published if published[name] != clean[name]}

    downloads.mkdir(exist_ok=True)
    (downloads / "labels.csv").unlink(missing_ok=True)
    browser = chromium(downloads)
    try:
        browser.get(page.as_uri())
        browser.execute_script("const f = document.getElementById('filter'); f.value = 'suspected';"
                               "f.dispatchEvent(new Event('change'))")
        cards = [card for card in browser.find_elements("css selector", ".card") if card.is_displayed()]
        flagged = []
        for card in cards:
            name = card.find_element("css selector", ".path").text
            box = card.find_element("css selector", "input.correction")
            box.clear()
            box.send_keys(clean[name])
            flagged.append(name)
        browser.execute_script("window.scrollTo(0, 0)")
        time.sleep(1)  # the first cards' images load as they come into view
        browser.save_screenshot(str(args.out / "review.png"))
        browser.find_element("css selector", "#download").click()
        deadline = time.monotonic() + 10
        while not (downloads / "labels.csv").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        browser.quit()
    shutil.copy(downloads / "labels.csv", args.out / "labels.csv")
    downloaded, _ = data.read_labels_csv(args.out / "labels.csv", root)
    summary = {
        "held_out": len(published), "whole_string_accuracy_against_published": report["whole_string_accuracy"],
        "held_out_wrong_published_labels": len(wrong), "cards": report["errors"],
        "suspected_cards": len(flagged), "suspected_and_wrong": len(set(flagged) & wrong),
        "suspected_but_right": len(set(flagged) - wrong), "wrong_not_suspected": len(wrong - set(flagged)),
        "downloaded_rows": len(downloaded),
        "held_out_disagreeing_with_clean": {"published": len(wrong),
                                            "downloaded": sum(downloaded[n] != clean[n] for n in published)},
        "rows_changed_by_download": sorted(n for n in downloaded if downloaded[n] != published[n]),
    }
    atomic.write_text(args.out / "summary.json", json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
