import re

import pytest
import yaml
from conftest import assert_one_line_error, run_in_process

from cli import UserError
from config import load_config


def test_defaults_load_and_every_key_is_commented():
    cfg = load_config()
    assert cfg["data"]["image_size"] == "auto"
    assert cfg["model"]["backbone"] == "Xception" and cfg["model"]["weights"] == "imagenet"
    lines = open(load_config.__globals__["DEFAULTS_PATH"]).read().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  ") and not line.strip().startswith("#"):
            assert lines[i - 1].strip().startswith("#"), f"config.yaml key without a comment: {line.strip()}"


def test_overrides_keep_types_and_strings_stay_verbatim():
    cfg = load_config(None, ["data.charset=0123456789", "data.image_size=[40, 100]", "train.learning_rate=1",
                             "data.labels=null"])
    assert load_config(None, ["data.image_size=auto"])["data"]["image_size"] == "auto"
    assert cfg["data"]["charset"] == "0123456789"  # not the integer 123456789
    assert cfg["data"]["image_size"] == [40, 100]
    assert cfg["train"]["learning_rate"] == 1.0 and isinstance(cfg["train"]["learning_rate"], float)


def test_length_is_a_number_or_a_range(tmp_path):
    assert load_config(None, ["data.length=5"])["data"]["length"] == [5, 5]
    assert load_config(None, ["data.length= 4 - 6"])["data"]["length"] == [4, 6]
    assert load_config(None, ["data.length=[4, 6]"])["data"]["length"] == [4, 6]  # as a run's config.yaml keeps it
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  length: 4-5\n")
    assert load_config(path)["data"]["length"] == [4, 5]
    path.write_text("data:\n  length: five\n")
    with pytest.raises(UserError, match=re.escape(str(path)) + ": data.length must be a number .* got 'five'"):
        load_config(path)


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(UserError, match=r"unknown config key train\.epoch; did you mean train\.epochs\?"):
        load_config(None, ["train.epoch=3"])


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs=three", "train.epochs must be an integer"),
    ("data.image_size=[50]", "data.image_size must be [height, width], like [50, 120], or auto, got [50]"),
    ("data.image_size=square", "data.image_size must be [height, width], like [50, 120], or auto, got 'square'"),
    ("data.image_size=[16,120]", "too small for the backbone"),
    ("data.case=title", "data.case must be one of sensitive, lower, upper"),
    ("data.test_fraction=1.5", "data.test_fraction is out of range"),
    ("data.charset=aab", "no repeated characters"),
    ("data.label_pattern=(", "not a valid regular expression"),
    ("model.backbone=NoSuchNet", "is not a keras.applications model"),
    ("train.epochs", "expected section.key=value"),
    ("data.length=0", "data.length must be a number of characters like 4, or a range MIN-MAX like 4-6"),
    ("data.length=6-4", "with 1 <= MIN < MAX, got '6-4'"),
    ("data.length=4-4", "with 1 <= MIN < MAX, got '4-4'"),
    ("data.length=0-4", "got '0-4'"),
    ("data.length=4-6-8", "got '4-6-8'"),
    ("data.length=[6, 4]", "got [6, 4]"),
    ("data.length=true", "got True"),
])
def test_bad_values_are_refused_with_the_key(override, fragment):
    with pytest.raises(UserError, match=None) as error:
        load_config(None, [override])
    assert fragment in str(error.value)


def test_a_fitted_synthetic_style_cannot_be_shared_across_sets():
    with pytest.raises(UserError, match="model.synthetic_style=fitted draws like one set's images, so its start "
                                        "cannot be shared: set model.synthetic_scope=set"):
        load_config(None, ["model.synthetic_style=fitted", "model.synthetic_scope=machine"])


def test_a_user_file_overrides_defaults_and_is_checked(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 3}}))
    assert load_config(path)["train"]["epochs"] == 3
    path.write_text(yaml.safe_dump({"trian": {"epochs": 3}}))
    with pytest.raises(UserError, match="unknown config key trian.epochs; did you mean train.epochs"):
        load_config(path)


def test_unknown_key_on_the_command_line_is_one_clear_line():
    result = run_in_process("train.py", "--set", "train.epoch=3")
    assert_one_line_error(result, "train.epoch", "train.epochs")
