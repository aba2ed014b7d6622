import collections
import random
import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import data
import synth
from cli import UserError

SIZE = (32, 64)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png():
    """A valid PNG header declaring 100000 x 100000 pixels."""
    content = bytearray(png_bytes(Image.new("L", (1, 1))))
    ihdr = bytearray(content[16:29])
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    content[16:29] = ihdr
    content[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(content)


def test_bad_files_give_a_short_reason(tmp_path):
    jpeg = io.BytesIO()
    Image.new("RGB", (120, 50), "red").save(jpeg, format="JPEG")
    cases = {
        "zero.png": (b"", "empty file"),
        "truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "corrupt image"),
        "page.png": (b"<html><body>503 Service Unavailable</body></html>", "not an image"),
        "bomb.png": (bomb_png(), "too large"),
    }
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(data.ImageError, match=reason):
            data.decode_image(tmp_path / name, SIZE)
    with pytest.raises(data.ImageError, match="unreadable: No such file"):
        data.decode_image(tmp_path / "absent.png", SIZE)


def test_every_image_mode_decodes_to_rgb_of_the_input_size(tmp_path):
    white, black = 255, 0
    frames = [Image.new("P", (60, 20), 1), Image.new("P", (60, 20), 2)]
    for frame in frames:
        frame.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    palette = Image.new("P", (60, 20), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    sixteen = Image.fromarray(np.full((20, 60), 65535, np.uint16))
    cases = {
        "anim.gif": (gif.read_bytes(), (255, 0, 0)),  # first frame: red, not the blue second one
        "sixteen.png": (png_bytes(sixteen), (white,) * 3),  # full 16-bit range is white, not clipped noise
        "palette.png": (png_bytes(palette), (white,) * 3),  # transparent pixels composited on white
        "onebit.png": (png_bytes(Image.new("1", (60, 20), 0)), (black,) * 3),
        "rgba.png": (png_bytes(Image.new("RGBA", (60, 20), (0, 0, 0, 0))), (white,) * 3),
    }
    cmyk = io.BytesIO()
    Image.new("CMYK", (60, 20), (0, 0, 0, 0)).save(cmyk, format="JPEG")
    cases["cmyk.jpg"] = (cmyk.getvalue(), (white,) * 3)
    for name, (content, colour) in cases.items():
        pixels = data.decode_image(content, SIZE)
        assert pixels.shape == (*SIZE, 3) and pixels.dtype == np.uint8, name
        assert np.abs(pixels.astype(int) - colour).max() <= 3, (name, pixels[0, 0])


def test_one_decode_gives_the_same_pixels_on_every_path(digits, tmp_path):
    from recognizer import decode_chunk

    paths = data.find_images(digits)[:5]
    expected = np.stack([data.decode_image(p, SIZE) for p in paths])
    from_bytes = np.stack([data.decode_image(p.read_bytes(), SIZE) for p in paths])
    from_pil = np.stack([data.decode_image(Image.open(p), SIZE) for p in paths])
    from_array = np.stack([data.decode_image(np.asarray(Image.open(p).convert("RGB")), SIZE) for p in paths])
    uncached = data.load_images(paths, SIZE).images  # training and evaluation
    data.load_images(paths, SIZE, tmp_path)
    cached = data.load_images(paths, SIZE, tmp_path).images
    predicted, errors = decode_chunk([str(p) for p in paths], SIZE)  # prediction
    assert not errors
    for other in (from_bytes, from_pil, from_array, uncached, cached, predicted):
        np.testing.assert_array_equal(other, expected)


def test_non_ascii_file_names_are_read_and_labelled(digits, tmp_path):
    source = data.find_images(digits)[0]
    (tmp_path / "验证码_2468.png").write_bytes(source.read_bytes())
    (tmp_path / "képek").mkdir()
    (tmp_path / "képek" / "1357_ü.png").write_bytes(source.read_bytes())
    items, _ = data.labelled_files(tmp_path, None, None, "sensitive", (4, 4), "0123456789")
    assert sorted(label for _, label in items) == ["1357", "2468"]
    images, _, failures, _ = data.load_images([path for path, _ in items], SIZE)
    assert not failures
    np.testing.assert_array_equal(images[0], data.decode_image(source, SIZE))


def test_symlinked_folders_are_read_once_and_a_link_loop_ends(digits, tmp_path):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    sources = data.find_images(digits)[:6]
    for i, source in enumerate(sources):
        ((root if i < 2 else elsewhere) / source.name).write_bytes(source.read_bytes())
    (root / "linked").symlink_to(elsewhere)
    (root / "linked_again").symlink_to(elsewhere)
    (elsewhere / "up").symlink_to(root)  # a loop: data/linked/up/linked/up/...
    expected = sorted([root / s.name for s in sources[:2]] + [root / "linked" / s.name for s in sources[2:]])
    assert data.find_images(root) == expected  # training
    assert data.expand_paths([str(root)]) == (expected, [])  # prediction
    items, _ = data.labelled_files(root, None, None, "sensitive", (4, 4), "0123456789")
    assert [path for path, _ in items] == expected


def test_cache_means_a_second_run_decodes_nothing(digits, tmp_path, monkeypatch):
    paths = data.find_images(digits)[:10]
    first, digests, failures, _ = data.load_images(paths, SIZE, tmp_path)
    monkeypatch.setattr(data, "read_and_decode", lambda job: pytest.fail("decoded again"))
    second, digests_again, _, _ = data.load_images(paths, SIZE, tmp_path)
    np.testing.assert_array_equal(first, second)
    assert digests == digests_again and not failures
    with pytest.raises(pytest.fail.Exception):  # another size is another key: it decodes again
        data.load_images(paths, (40, 64), tmp_path)


def test_split_is_deterministic_disjoint_and_keeps_duplicates_together():
    digests = [f"d{i % 90}" for i in range(100)]  # ten images appear twice
    train, test = data.split_train_test(digests, 0.2, seed=3)
    again_train, again_test = data.split_train_test(digests, 0.2, seed=3)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(test, again_test)
    assert not set(train) & set(test) and len(train) + len(test) == 100
    assert 20 <= len(test) <= 21
    assert not {digests[i] for i in train} & {digests[i] for i in test}
    assert set(data.split_train_test(digests, 0.2, seed=4)[1]) != set(test)
    # A fixed length is one stratum: the split made before length ranges existed, to the image.
    assert test.tolist() == [3, 4, 8, 14, 19, 29, 39, 43, 45, 48, 51, 57, 72, 77, 79, 86, 88, 93, 94, 98]
    np.testing.assert_array_equal(data.split_train_test(digests, 0.2, seed=3, strata=[4] * 100)[1], test)


def test_split_keeps_each_lengths_share_and_duplicates_together():
    lengths = [4] * 150 + [5] * 60 + [6] * 20 + [7] * 3
    digests = [f"d{i}" for i in range(len(lengths))]
    digests[205:215] = digests[190:200]  # ten length-5 images repeated, five of them with length-6 labels
    train, test = data.split_train_test(digests, 0.1, seed=0, strata=lengths)
    again = data.split_train_test(digests, 0.1, seed=0, strata=lengths)
    np.testing.assert_array_equal(test, again[1])
    assert not set(train) & set(test) and len(train) + len(test) == len(lengths)
    held_out = collections.Counter(lengths[i] for i in test)
    # 10% of each length (at least one); a repeated image goes with its group, whatever its label says.
    assert held_out[4] == 15 and 6 <= held_out[5] <= 7 and 1 <= held_out[6] <= 3 and held_out[7] == 1
    assert not {digests[i] for i in train} & {digests[i] for i in test}

def test_labels_from_file_names(tmp_path):
    def fits(label):
        return len(label) == 4 and set(label) <= set("0123456789")

    assert data.label_from_name("a/1234.png", None, fits, (4, 4)) == "1234"
    assert data.label_from_name("1234_17.png", None, fits, (4, 4)) == "1234"
    assert data.label_from_name("captcha_5678.jpg", None, fits, (4, 4)) == "5678"
    assert data.label_from_name("验证码_5678.jpg", None, fits, (4, 4)) == "5678"
    assert data.label_from_name("img-0042-x7Kq.png", r"img-\d+-(?P<label>\w+)", fits, (4, 4)) == "x7Kq"
    assert data.label_from_name("other.png", r"img-(\w+)", fits, (4, 4)) is None
    assert data.label_from_name("abcd_1.png", None, fits, (4, 4)) == "abcd"  # right length, wrong charset: named in errors


def test_label_csv_quirks_are_tolerated_and_reported(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (tmp_path / name).write_bytes(b"x")
    rows = ["filename,label,source", "a.png, 1234 ,scraper", "", "b.png,5678", "b.png,5678", "c.png,1111",
            "c.png,2222", "missing.png,0000", "d.png,9999"]
    (tmp_path / "labels.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")
    labels, notes = data.read_labels_csv(tmp_path / "labels.csv", tmp_path)
    assert {k: v.strip() for k, v in labels.items()} == {"a.png": "1234", "b.png": "5678", "d.png": "9999"}
    assert any("missing files" in n for n in notes)
    assert any("repeated" in n for n in notes)
    assert any("different labels" in n and "c.png" in n for n in notes)


def test_case_policy_and_spaces():
    assert data.normalise_label(" aB3 ", "sensitive") == "aB3"
    assert data.normalise_label(" aB3 ", "lower") == "ab3"
    assert data.normalise_label(" aB3 ", "upper") == "AB3"


def test_labels_that_do_not_fit_are_named():
    items = [("x/1.png", "123"), ("x/2.png", "12a4"), ("x/3.png", "1234")]
    good, bad = data.split_by_label_problem(items, (4, 4), "0123456789")
    assert good == [("x/3.png", "1234")]
    assert [why for _, _, why in bad] == ["length 3, not 4", "characters not in the charset: 'a'"]
    assert "x/1.png '123' (length 3, not 4)" in data.describe(bad, None)
    items += [("x/4.png", "12345"), ("x/5.png", "123456")]
    good, bad = data.split_by_label_problem(items, (4, 5), "0123456789")
    assert good == [("x/3.png", "1234"), ("x/4.png", "12345")]
    assert [why for _, _, why in bad] == ["length 3, not 4-5", "characters not in the charset: 'a'",
                                          "length 6, not 4-5"]


def test_file_names_give_labels_of_every_length_in_the_range(tmp_path):
    for name in ("123.png", "1234_a.png", "x_12345.png", "12_b.png", "123456_c.png"):
        (tmp_path / name).write_bytes(b"")
    items, _ = data.labelled_files(tmp_path, None, None, "sensitive", (3, 5), "0123456789")
    labels = {path.name: label for path, label in items}
    assert {name: labels[name] for name in ("123.png", "1234_a.png", "x_12345.png")} == {
        "123.png": "123", "1234_a.png": "1234", "x_12345.png": "12345"}
    _, bad = data.split_by_label_problem(items, (3, 5), "0123456789")
    assert sorted(path.name for path, _, _ in bad) == ["123456_c.png", "12_b.png"]
    items, _ = data.labelled_files(tmp_path, None, r"x_(\d+)", "sensitive", (3, 5), "0123456789")
    assert [(path.name, label) for path, label in items] == [("x_12345.png", "12345")]


def test_missing_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(UserError, match="data folder not found: .*nowhere"):
        data.labelled_files(tmp_path / "nowhere", None, None, "sensitive", (4, 4), None)
    with pytest.raises(UserError, match="no images"):
        data.labelled_files(tmp_path, None, None, "sensitive", (4, 4), None)


def test_synthesis_is_reproducible_whatever_the_number_of_processes(tmp_path):
    synth.draw_set(tmp_path / "a", 6, size=(32, 64), seed=7, processes=1)
    synth.draw_set(tmp_path / "b", 6, size=(32, 64), seed=7, processes=2)
    synth.draw_set(tmp_path / "c", 6, size=(32, 64), seed=8, processes=1)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(names) == 6
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    assert names != sorted(p.name for p in (tmp_path / "c").iterdir())  # another seed, other captchas


def test_synthesis_like_a_folder_draws_in_its_size_colours_and_grain(tmp_path, monkeypatch):
    # A scheme unlike the captcha package's: light ink on a dark, grainy background, 40x100.
    scheme = synth.Style(background=(20, 40), ink=(200, 255), opaque=True, noise=25.0, dots=0, arcs=0)
    synth.draw_set(tmp_path / "theirs", 24, size=(40, 100), seed=2, style=scheme, processes=1)
    monkeypatch.setattr(synth, "FIT_DRAWS", 8)
    monkeypatch.setattr(synth, "FIT_PASSES", 1)
    data.main(["synth", "--like", str(tmp_path / "theirs"), "--out", str(tmp_path / "ours"), "--count", "24",
               "--charset", "0123456789"])
    theirs, ours = ([np.asarray(Image.open(p)) for p in sorted((tmp_path / name).iterdir())] for name in ("theirs", "ours"))
    assert {image.shape for image in ours} == {(40, 100, 3)}
    measured = {name: synth.statistics(images).mean(0) for name, images in (("theirs", theirs), ("ours", ours))}
    for statistic, tolerance in (("background_red", 15), ("ink_green", 40), ("noise", 8)):
        i = synth.STATISTICS.index(statistic)
        assert abs(measured["ours"][i] - measured["theirs"][i]) < tolerance, statistic
    package = synth.statistics([np.asarray(synth.Drawer((40, 100)).draw("1234", random.Random(0)))])
    assert package[0, synth.STATISTICS.index("background_red")] > 200  # what it drew before: light, no grain
    with pytest.raises(UserError, match="--like .*nowhere: not a folder of images"):
        data.main(["synth", "--like", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--count", "1"])


def test_synthesis_of_a_length_range_gives_each_length_an_equal_share(tmp_path, capsys):
    for folder in ("a", "b"):
        data.main(["synth", "--out", str(tmp_path / folder), "--count", "6", "--length", "2-4", "--size", "32x64",
                   "--seed", "3"])
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert sorted(len(name.split("_")[0]) for name in names) == [2, 2, 3, 3, 4, 4]
    with pytest.raises(SystemExit):
        data.main(["synth", "--out", str(tmp_path / "c"), "--count", "1", "--length", "4-2"])
    assert "expected a number of characters like 4, or a range MIN-MAX" in capsys.readouterr().err


charsets = st.lists(st.characters(exclude_categories=("C", "Z"), exclude_characters="/\\_."), min_size=1,
                    max_size=40, unique=True).map("".join)


@settings(max_examples=200, deadline=None)
@given(charsets, st.data())
def test_encoding_round_trips(charset, draw):
    """A fixed length: each character's index in the charset, no blank, as before length ranges."""
    labels = draw.draw(st.lists(st.text(st.sampled_from(charset), min_size=3, max_size=3), min_size=1, max_size=20))
    encoded = data.encode(labels, charset, 3)
    assert encoded.tolist() == [[charset.index(c) for c in label] for label in labels]
    assert data.decode(encoded, charset) == labels


@settings(max_examples=200, deadline=None)
@given(charsets, st.data())
def test_padded_encoding_round_trips(charset, draw):
    shortest = draw.draw(st.integers(1, 5))
    longest = draw.draw(st.integers(shortest + 1, 7))
    labels = draw.draw(st.lists(st.text(st.sampled_from(charset), min_size=shortest, max_size=longest), min_size=1,
                                max_size=20))
    encoded = data.encode(labels, charset, longest)
    assert encoded.shape == (len(labels), longest) and encoded.max() < data.class_count(charset, (shortest, longest))
    for label, row in zip(labels, encoded.tolist()):
        assert row == [charset.index(c) for c in label] + [len(charset)] * (longest - len(label))
    assert data.decode(encoded, charset) == labels


@settings(max_examples=200, deadline=None)
@given(charsets, st.data())
def test_a_reading_is_the_text_before_its_first_blank(charset, draw):
    blank = len(charset)
    rows = draw.draw(st.lists(st.lists(st.integers(0, blank), min_size=4, max_size=4), min_size=1, max_size=10))
    texts = data.decode(np.array(rows), charset)
    for row, text in zip(rows, texts):
        before_blank = row[:row.index(blank)] if blank in row else row
        assert text == "".join(charset[i] for i in before_blank)
    # Re-encoded, a reading keeps what comes before its first blank and holds the blank after it.
    for row, again in zip(rows, data.encode(texts, charset, 4).tolist()):
        cut = row.index(blank) if blank in row else 4
        assert again == row[:cut] + [blank] * (4 - cut)


@settings(max_examples=200, deadline=None)
@given(charsets, st.data())
def test_file_name_labels_parse_back(charset, draw):
    label = draw.draw(st.text(st.sampled_from(charset), min_size=4, max_size=4))
    tag = draw.draw(st.text(st.sampled_from("abcxyz0123"), min_size=1, max_size=6))

    def fits(candidate):
        return len(candidate) == 4 and set(candidate) <= set(charset)

    for name in (f"{label}.png", f"{label}_{tag}.png"):
        assert data.label_from_name(name, None, fits, (4, 4)) == label
    if not fits(tag) or tag == label:
        assert data.label_from_name(f"{tag}_{label}.png", None, fits, (4, 4)) == label


@settings(max_examples=200, deadline=None)
@given(charsets, st.data())
def test_file_name_labels_of_every_length_in_the_range_parse_back(charset, draw):
    shortest = draw.draw(st.integers(1, 5))
    longest = draw.draw(st.integers(shortest + 1, 8))
    label = draw.draw(st.text(st.sampled_from(charset), min_size=shortest, max_size=longest))
    tag = draw.draw(st.text(st.sampled_from("abcxyz0123"), min_size=1, max_size=6))

    def fits(candidate):
        return shortest <= len(candidate) <= longest and set(candidate) <= set(charset)

    for name in (f"{label}.png", f"{label}_{tag}.png"):
        assert data.label_from_name(name, None, fits, (shortest, longest)) == label
    if not fits(tag) or tag == label:
        assert data.label_from_name(f"{tag}_{label}.png", None, fits, (shortest, longest)) == label


@pytest.mark.parametrize("length", [5, 6])
def test_auto_input_size_gives_the_backbone_a_column_of_features_per_character_and_one_more(tmp_path, length):
    # 118x51 captchas at 50x120's pixel count alone would be 48x120: 4 columns of Xception's map for 5 letters.
    import model

    Image.new("RGB", (118, 51)).save(tmp_path / "esaj.png")
    (height, width), why = data.auto_image_size([tmp_path / "esaj.png"], length)
    assert height == 48 and "widened" in why
    pixels = model.keras.Input((height, width, 3))
    features, _ = model.build_backbone("Xception", "none", pixels, pooling=None)
    assert features.shape[2] == length + 1


def test_auto_input_size_keeps_the_captchas_shape(tmp_path, monkeypatch):
    # 4:1 captchas are not squeezed into 50x120's 2.4:1: auto keeps the images' median shape at about
    # as many pixels, each side a multiple of 8; a file that is no image does not count.
    for i, (width, height) in enumerate([(200, 50)] * 3 + [(130, 52)] * 2):
        Image.new("RGB", (width, height)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert data.auto_image_size(sorted(tmp_path.iterdir()), 3) == ([40, 152], "the images' median width:height is 4.00")
    assert data.auto_image_size([tmp_path / "4.png"], 2)[0] == [48, 120]
    Image.new("RGB", (400, 20)).save(tmp_path / "strip.png")  # 20:1: the backbone still gets 32 pixels of height
    assert data.auto_image_size([tmp_path / "strip.png"], 4)[0] == [32, 344]
    opened = []
    monkeypatch.setattr(data, "read_bytes", lambda path: opened.append(path) or (tmp_path / "0.png").read_bytes())
    data.auto_image_size([tmp_path / "0.png"] * (data.AUTO_SAMPLE * 2 - 1), 4)
    assert len(opened) == data.AUTO_SAMPLE  # a header sample, not every file


def test_the_split_does_not_change_with_the_input_size(tmp_path):
    # Digests are of the full-size pixels: a run at another data.image_size (or continued from one)
    # holds out the same captchas, and captchas that differ only in fine detail stay distinct.
    rng = np.random.default_rng(0)
    paths = []
    for i in range(40):
        pixels = rng.integers(0, 256, (50, 200, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    fine = np.full((50, 200, 3), 255, np.uint8)
    Image.fromarray(fine).save(tmp_path / "plain.png")
    fine[0, 0] = 0  # one pixel, lost when shrunk to 4x4
    Image.fromarray(fine).save(tmp_path / "dot.png")
    paths += [tmp_path / "plain.png", tmp_path / "dot.png"]
    small_images, small, _, _ = data.load_images(paths, (4, 4))
    large = data.load_images(paths, (50, 120)).digests
    assert small == large
    np.testing.assert_array_equal(small_images[-1], small_images[-2])
    assert small[-1] != small[-2]
    for a, b in zip(data.split_train_test(small, 0.2, seed=0), data.split_train_test(large, 0.2, seed=0)):
        np.testing.assert_array_equal(a, b)
