"""The review page: one self-contained HTML file to look at captchas and correct their labels.

evaluate.py --html shows the wrong readings of a labelled set, predict.py --html the readings of
unlabelled captchas; write_page renders both. The page needs no server and no network: the images
are embedded, and its button downloads every label, corrected, as the filename,label CSV that
train.py reads (data.labels).

Every text from file names and labels reaches the page only as JSON, which the page's script puts
on screen as text: nothing in a name or a label can become markup or code.
"""
import argparse
import base64
import json
import mimetypes
import os
import shlex
from pathlib import Path

import atomic
import data
import run
from recognizer import SURE_CONFIDENCE


def write_page(path, heading, model, root, cards, labels, metadata, report=None):
    """Writes the review page.

    model: the model as the command named it. root: the folder that card and label paths are relative to
    (data.dir for the next training), shown relative to the working folder.
    cards: dicts with path, label (None for unlabelled captchas), reading, confidence (None where not
    scored), suspected (a suspected label error) and reason (why it was not scored, or None), in the order
    to show them. labels: (path, label) for every image the downloaded CSV lists; a card's text box
    replaces its label. report: evaluate.py's report, whose figures head the page.
    """
    shown_root = os.path.relpath(root)
    page = {"heading": heading, "model": str(model), "root": shown_root, "report": report,
            "threshold": SURE_CONFIDENCE, "charset": metadata["charset"], "lengths": run.model_lengths(metadata),
            "case": metadata.get("case", "sensitive"), "labels": [list(row) for row in labels],
            "train_command": f"python train.py --set data.dir={shlex.quote(shown_root)} --set data.labels=labels.csv",
            "cards": [{**card, **embedded_image(Path(root) / card["path"])} for card in cards]}
    # In a script element only "</script" or "<!--" could end the JSON early; with <, > and & escaped
    # JSON.parse still reads the same strings, and the HTML parser sees no markup at all.
    text = json.dumps(page, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    atomic.write_text(path, PAGE.replace("PAGE_DATA", text, 1))


def embedded_image(path):
    """The image's own bytes as a data URI, and its size, so that the page reserves its place before showing
    it; nothing for a file that is missing or not an image, whose card says why."""
    try:
        content = Path(path).read_bytes()
        width, height = data.open_image(content).size
    except (OSError, data.ImageError):
        return {}
    mime = mimetypes.guess_type(path.name)[0] or "image/png"  # browsers sniff the format of an image anyway
    return {"image": f"data:{mime};base64,{base64.b64encode(content).decode('ascii')}",
            "width": width, "height": height}


PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>captcha review</title>
<style>
[hidden] { display: none !important; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #f4f4f2; }
header, #figures { padding: 12px 20px; background: #fff; border-bottom: 1px solid #ddd; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 13px; margin: 0 0 6px; color: #555; font-weight: 600; }
.muted { color: #666; }
code, .mono { font-family: ui-monospace, Menlo, Consolas, monospace; }
#controls { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; margin-top: 8px; }
#controls button { font: inherit; padding: 6px 14px; border: 1px solid #2a6; background: #2a6; color: #fff;
  border-radius: 4px; cursor: pointer; }
#status { color: #b00; }
#figures { display: flex; gap: 28px; flex-wrap: wrap; align-items: flex-start; }
.figure:first-child { max-width: 240px; }
.big { font-size: 32px; font-weight: 700; margin: 0; }
table { border-collapse: collapse; }
td, th { padding: 2px 8px; text-align: right; border-bottom: 1px solid #eee; font-variant-numeric: tabular-nums; }
#confusions { margin: 0; padding-left: 20px; }
#coverage text { font-size: 11px; fill: #444; }
#coverage .accuracy { font-weight: 600; fill: #163; }
#cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; padding: 16px 20px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px;
  content-visibility: auto; contain-intrinsic-size: auto 260px; }
.card:focus-within { outline: 3px solid #48f; }
.card.suspected { border-left: 5px solid #d80; }
.card.corrected { background: #efe; }
.noimage { height: 40px; margin: 0; color: #b00; background: #fee; text-align: center; line-height: 40px; }
.reason { color: #b00; }
.card img { display: block; width: 100%; height: auto; image-rendering: pixelated; background: #eee; }
.card p { margin: 4px 0; }
.path { font-size: 12px; color: #555; overflow-wrap: anywhere; }
.text { font-size: 18px; letter-spacing: 2px; }
mark { background: #fc6; }
.flag { font-size: 12px; padding: 1px 6px; border-radius: 3px; margin-left: 2px; }
.flag.suspected { background: #fd9; }
.flag.unsure { background: #dde; }
.card input { font: 18px ui-monospace, Menlo, Consolas, monospace; letter-spacing: 2px; width: 100%;
  box-sizing: border-box; padding: 4px 6px; }
.card input:invalid { outline: 2px solid #d00; background: #fee; }
</style>
</head>
<body>
<header>
<h1 id="heading"></h1>
<p class="muted">model <span id="model" class="mono"></span>; paths relative to <span id="root" class="mono"></span></p>
<p id="help" class="muted"></p>
<div id="controls">
<label>Show <select id="filter"></select></label>
<button id="download" type="button">Download labels CSV</button>
<span id="corrections" class="muted"></span>
<span id="status" role="status"></span>
</div>
</header>
<section id="figures" hidden></section>
<main id="cards"></main>
<script type="application/json" id="page-data">PAGE_DATA</script>
<script>
"use strict";
const page = JSON.parse(document.getElementById("page-data").textContent);
const cards = page.cards;
const percent = x => x === null ? "n/a" : (100 * x).toFixed(2) + "%";

// Every text goes in as textContent: nothing from a file name or a label is ever parsed as HTML.
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setText(id, text) { document.getElementById(id).textContent = text; }

// text, with the characters that differ from other (position by position) marked.
function marked(text, other) {
  const node = el("span", "text mono"), others = [...other];
  [...text].forEach((char, i) => node.append(char === others[i] ? char : el("mark", "", char)));
  return node;
}

// Why a label cannot be trained on, as data.label_problem says it; "" when it can. Empty: left out.
function problem(label) {
  const folded = page.case === "lower" ? label.toLowerCase() : page.case === "upper" ? label.toUpperCase() : label;
  const chars = [...folded];
  if (!chars.length) return "";
  const [shortest, longest] = page.lengths;
  if (chars.length < shortest || chars.length > longest) {
    return `length ${chars.length}, not ${shortest === longest ? shortest : shortest + "-" + longest}`;
  }
  const unknown = chars.filter(c => !page.charset.includes(c));
  return unknown.length ? `characters not in the charset: ${unknown.join("")}` : "";
}

function figure(title, ...content) {
  const box = el("div", "figure");
  box.append(el("h2", "", title), ...content);
  return box;
}

// The coverage table as a chart: whole-string accuracy when only the most confident share is answered.
function coverageChart(rows) {
  const width = 330, height = 170, left = 44, right = 30, top = 20, bottom = 36;
  const svgEl = (tag, attrs, text) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const points = rows.filter(r => r.whole_string_accuracy !== null);
  const lowX = Math.min(...rows.map(r => r.coverage));
  const lowY = Math.min(0.9, ...points.map(r => Math.floor(r.whole_string_accuracy * 10) / 10));
  const x = c => left + (c - lowX) / (1 - lowX || 1) * (width - left - right);
  const y = a => top + (1 - a) / (1 - lowY) * (height - top - bottom);
  const svg = svgEl("svg", {id: "coverage", width, height, viewBox: `0 0 ${width} ${height}`, role: "img"});
  svg.append(
    svgEl("line", {x1: left, y1: y(lowY), x2: width - right, y2: y(lowY), stroke: "#999"}),
    svgEl("line", {x1: left, y1: top, x2: left, y2: y(lowY), stroke: "#999"}),
    svgEl("text", {x: left - 6, y: y(1) + 4, "text-anchor": "end"}, "100%"),
    svgEl("text", {x: left - 6, y: y(lowY) + 4, "text-anchor": "end"}, `${Math.round(lowY * 100)}%`),
    svgEl("text", {x: (left + width - right) / 2, y: height - 4, "text-anchor": "middle"},
          "share answered, most confident first"),
    svgEl("polyline", {points: points.map(r => `${x(r.coverage)},${y(r.whole_string_accuracy)}`).join(" "),
                       fill: "none", stroke: "#2a6", "stroke-width": 2}));
  for (const r of rows) {
    const share = `${Math.round(r.coverage * 100)}%`;
    svg.append(svgEl("text", {x: x(r.coverage), y: y(lowY) + 14, "text-anchor": "middle"}, share));
    if (r.whole_string_accuracy === null) continue;
    const point = svgEl("circle", {cx: x(r.coverage), cy: y(r.whole_string_accuracy), r: 4, fill: "#2a6"});
    point.append(svgEl("title", {}, `answering the most confident ${share} (confidence at least ` +
                       `${r.min_confidence.toFixed(4)}): ${percent(r.whole_string_accuracy)} read right`));
    svg.append(point, svgEl("text", {class: "accuracy", x: x(r.coverage), y: y(r.whole_string_accuracy) - 8,
                                     "text-anchor": "middle"}, percent(r.whole_string_accuracy)));
  }
  return svg;
}

function showFigures(report) {
  const section = document.getElementById("figures");
  const whole = el("p", "big", percent(report.whole_string_accuracy));
  whole.id = "whole-string-accuracy";
  const positions = el("table");
  positions.id = "per-position";
  const header = positions.insertRow(), values = positions.insertRow();
  report.per_position_accuracy.forEach((accuracy, i) => {
    header.append(el("th", "", String(i + 1)));
    values.append(el("td", "", percent(accuracy)));
  });
  const confusions = el("ol");
  confusions.id = "confusions";
  for (const c of report.confusions) {
    confusions.append(el("li", "mono", `${c.true} \u2192 ${c.predicted} \u00d7${c.count}`));
  }
  if (!report.confusions.length) confusions.append(el("li", "muted", "none"));
  const counts = el("p", "muted", `${report.correct} of ${report.count} read right; ${report.errors} wrong, ` +
    `${report.suspected_label_errors.count} suspected label errors; ${report.skipped} skipped`);
  counts.id = "counts";
  section.append(figure("Whole-string accuracy", whole, counts), figure("Accuracy per position", positions),
                 figure("Confusions (true \u2192 read)", confusions),
                 figure("Answer only when sure", coverageChart(report.coverage)));
  section.hidden = false;
}

function cardElement(card) {
  const node = el("article", "card" + (card.suspected ? " suspected" : ""));
  const img = el("img");
  if (card.image) {
    Object.assign(img, {decoding: "async", width: card.width, height: card.height, alt: card.path});
    node.append(img);
  } else {
    node.append(el("p", "noimage", "no image to show"));
  }
  node.append(el("p", "path mono", card.path));
  if (card.label !== null) {
    const label = el("p", "label", "label ");
    label.append(marked(card.label, card.reading));
    node.append(label);
  }
  const reading = el("p", "reading", "read ");
  reading.append(marked(card.reading, card.label === null ? card.reading : card.label));
  const confidence = card.reason ? el("p", "confidence reason", `not scored: ${card.reason}`)
                                 : el("p", "confidence", `confidence ${card.confidence.toFixed(4)}`);
  if (card.suspected) confidence.append(" ", el("span", "flag suspected", "suspected label error"));
  if (card.unsure) confidence.append(" ", el("span", "flag unsure", "unsure"));
  const input = el("input", "correction");
  Object.assign(input, {value: card.prefill, spellcheck: false, autocomplete: "off"});
  input.setAttribute("aria-label", `label of ${card.path}`);
  input.addEventListener("input", () => check(card));
  card.input = input;
  node.append(reading, confidence, input);
  return node;
}

// A card's image is given its source only as the card nears the screen: 10,000 embedded images given
// theirs at once would hold the page for seconds.
const cardOf = new Map();
const imageLoader = new IntersectionObserver(entries => {
  for (const entry of entries.filter(entry => entry.isIntersecting)) {
    const image = entry.target.querySelector("img");
    if (image) image.src = cardOf.get(entry.target).image;
    imageLoader.unobserve(entry.target);
  }
}, {rootMargin: "1000px"});

function check(card) {
  const value = card.input.value.trim();
  card.input.setCustomValidity(problem(value));
  card.input.title = problem(value);
  card.element.classList.toggle("corrected", value !== card.prefill);
  setText("corrections", `${cards.filter(c => c.input.value.trim() !== c.prefill).length} corrected`);
}

// Labelled cards are wrong readings (evaluate.py); unlabelled ones are readings to check (predict.py).
const labelled = page.report !== null || cards.some(card => card.label !== null);
const filters = {
  all: [labelled ? "all errors" : "all readings", () => true],
  suspected: ["suspected label errors only", card => card.suspected],
  unsure: [`unsure readings only (confidence below ${page.threshold})`, card => card.unsure],
  unscored: ["not scored only (missing, unreadable, or a label the model cannot read)", card => Boolean(card.reason)],
};

function applyFilter() {
  const keep = filters[document.getElementById("filter").value][1];
  for (const card of cards) card.element.hidden = !keep(card);
}

// Enter and Shift+Enter move to the next and previous shown card, as Tab and Shift+Tab do.
function move(event) {
  if (event.key !== "Enter" || !event.target.matches("input.correction")) return;
  event.preventDefault();
  const shown = [...document.querySelectorAll(".card:not([hidden]) input.correction")];
  const next = shown[shown.indexOf(event.target) + (event.shiftKey ? -1 : 1)];
  if (next) {
    next.focus({preventScroll: true});
    next.closest(".card").scrollIntoView({block: "nearest"});
  }
}

// A spreadsheet evaluates a cell starting with one of these: an apostrophe keeps it text, as cli.csv_cell does.
function csvField(text) {
  const formula = /^[=+\-@\t\r]/.test(text) || /^'[=+\-@\t\r']/.test(text);
  const cell = formula ? "'" + text : text;
  return /[",\r\n]/.test(cell) ? `"${cell.replaceAll('"', '""')}"` : cell;
}

function download() {
  const bad = cards.filter(card => problem(card.input.value.trim()));
  if (bad.length) {
    setText("status", `${bad.length} labels cannot be trained on, such as ${bad[0].path}: ` +
                      problem(bad[0].input.value.trim()));
    bad[0].input.focus();
    return;
  }
  setText("status", "");
  const corrected = new Map(cards.map(card => [card.path, card.input.value.trim()]));
  const rows = page.labels.map(([path, label]) => [path, corrected.has(path) ? corrected.get(path) : label]);
  const kept = rows.filter(([, label]) => label !== "");  // an emptied box leaves its image out
  const csv = [["filename", "label"], ...kept].map(row => row.map(csvField).join(",")).join("\n") + "\n";
  const link = el("a");
  link.href = URL.createObjectURL(new Blob([csv], {type: "text/csv"}));
  link.download = "labels.csv";
  link.click();
}

document.title = page.heading;
setText("heading", page.heading);
setText("model", page.model);
setText("root", page.root);
setText("help", `Correct a label in its box where the image shows it is wrong; empty a box to leave its image out. ` +
  `Tab or Enter: next card; Shift+Tab or Shift+Enter: back. The button saves filename,label for all ` +
  `${page.labels.length} images, corrected: train on it with ${page.train_command}`);
if (page.report) showFigures(page.report);
const fragment = document.createDocumentFragment();
for (const card of cards) {
  card.prefill = card.label === null ? card.reading : card.label;
  card.unsure = card.confidence !== null && card.confidence < page.threshold;
  card.element = cardElement(card);
  cardOf.set(card.element, card);
  imageLoader.observe(card.element);
  fragment.append(card.element);
}
const grid = document.getElementById("cards");
grid.append(cards.length ? fragment : el("p", "muted", labelled ? "No wrong readings." : "No captchas read."));
grid.addEventListener("keydown", move);
const filter = document.getElementById("filter");
for (const [name, [text, keep]] of Object.entries(filters)) {
  if ((name === "suspected" && !labelled) || (name === "unscored" && !cards.some(keep))) continue;
  const option = el("option", "", `${text}: ${cards.filter(keep).length}`);
  option.value = name;
  filter.append(option);
}
filter.addEventListener("change", applyFilter);
document.getElementById("download").addEventListener("click", download);
setText("corrections", "0 corrected");
</script>
</body>
</html>
"""


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="This module has no command of its own: "
                            "evaluate.py --html and predict.py --html write its pages.").parse_args()
    raise SystemExit("review.py writes no page by itself: run evaluate.py --html or predict.py --html")
