"""The one place that loads and validates a training config.

The shipped config.yaml holds every key with its default; a user's file and
`--set section.key=value` overrides may only change keys that exist there, and
each keeps the type of its default. Every check a config can fail is made here,
before a run writes anything.
"""
import difflib
import re
from pathlib import Path

import yaml

from cli import UserError

DEFAULTS_PATH = Path(__file__).with_name("config.yaml")
MIN_IMAGE_SIDE = 32  # every supported backbone downsamples by 32
CHOICES = {
    "data.case": ("sensitive", "lower", "upper"),
    "model.weights_fallback": ("synthetic", "none", "stop"),
    "model.synthetic_style": ("fitted", "captcha"),
    "model.synthetic_scope": ("set", "machine"),
    "model.head": ("pooled", "attention"),
    "train.self_training": ("rounds", "consistency"),
    "train.precision": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
    "train.distribute": ("none", "data_parallel"),
}
# Two keys take a value of either of two types: data.length, a number (a fixed length) or a range of
# lengths, and data.image_size, [height, width] or `auto`. Inside the code data.length is always
# [shortest, longest].
LENGTH_RULE = "a number of characters like 4, or a range MIN-MAX like 4-6 with 1 <= MIN < MAX"
IMAGE_SIZE_RULE = "[height, width], like [50, 120], or auto"


def read_yaml(path):
    try:
        with open(path, encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except OSError as e:  # a folder, a file without read permission
        raise UserError(f"config file {path} cannot be read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} must hold sections of keys, like the shipped config.yaml")
    return content


def flatten(cfg):
    return {f"{s}.{k}": v for s, keys in cfg.items() for k, v in keys.items()}


def parse_length(value):
    """data.length as written (4, "4-6", or [4, 6] as a run's config.yaml keeps it) -> [shortest, longest],
    or None when it is none of these (see LENGTH_RULE)."""
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        shortest, longest = value
        return [shortest, longest] if 1 <= shortest <= longest else None
    if type(value) is int:
        return [value, value] if value >= 1 else None
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value) if isinstance(value, str) else None
    shortest, longest = (int(match[1]), int(match[2])) if match else (0, 0)
    return [shortest, longest] if 1 <= shortest < longest else None


def shown_length(lengths):
    """[4, 4] -> "4"; [4, 6] -> "4-6", as data.length is written."""
    return str(lengths[0]) if lengths[0] == lengths[1] else f"{lengths[0]}-{lengths[1]}"


def checked_value(key, value, default, source):
    """Returns value with the type of default, or raises UserError."""
    if key == "data.length":
        lengths = parse_length(value)
        if lengths is None:
            raise UserError(f"{source}: data.length must be {LENGTH_RULE}, got {value!r}")
        return lengths
    if key == "data.image_size":
        if value != "auto" and not (isinstance(value, list) and len(value) == 2
                                    and all(type(v) is int for v in value)):
            raise UserError(f"{source}: data.image_size must be {IMAGE_SIZE_RULE}, got {value!r}")
        return value
    kind = type(default)
    expected = {type(None): "a string or null", bool: "true or false", int: "an integer", float: "a number",
                str: "a string", list: f"a list like {default}"}
    ok = (
        (kind is type(None) and (value is None or (isinstance(value, str) and value != "")))
        or (kind is bool and isinstance(value, bool))
        or (kind is int and type(value) is int)
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind is str and isinstance(value, str))
        or (kind is list and isinstance(value, list) and len(value) == len(default)
            and all(type(v) is type(d) for v, d in zip(value, default)))
    )
    if not ok:
        raise UserError(f"{source}: {key} must be {expected[kind]}, got {value!r}")
    return float(value) if kind is float else value


def apply(cfg, defaults, key, value, source):
    flat_defaults = flatten(defaults)
    if key not in flat_defaults:
        close = difflib.get_close_matches(key, flat_defaults, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"{source}: unknown config key {key}{hint}")
    section, name = key.split(".", 1)
    cfg[section][name] = checked_value(key, value, flat_defaults[key], source)


def parse_override(text, defaults):
    """`section.key=value`: the value is YAML, except for string keys, which take it verbatim
    (so that a charset like 0123456789 stays a string, and an empty one stays empty)."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise UserError(f"--set {text}: expected section.key=value")
    key = key.strip()
    default = flatten(defaults).get(key)
    verbatim = isinstance(default, str) and key != "data.image_size"
    if verbatim or (default is None and raw.strip() not in ("null", "~")):
        return key, raw
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError:
        raise UserError(f"--set {text}: the value is not valid YAML") from None


def validate(cfg):
    data, model, train = cfg["data"], cfg["model"], cfg["train"]
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        if cfg[section][name] not in choices:
            raise UserError(f"{key} must be one of {', '.join(choices)}, got {cfg[section][name]!r}")
    if data["image_size"] != "auto" and min(data["image_size"]) < MIN_IMAGE_SIDE:
        raise UserError(f"data.image_size {data['image_size']} is too small for the backbone, which "
                        f"downsamples by 32: each side must be at least {MIN_IMAGE_SIDE} pixels")
    bounds = [("data.max_train_images", data["max_train_images"] >= 0),
              ("data.test_fraction", 0 < data["test_fraction"] < 1),
              ("model.dropout", 0 <= model["dropout"] < 1), ("train.epochs", train["epochs"] >= 1),
              ("model.synthetic_images", model["synthetic_images"] >= 10),
              ("model.synthetic_epochs", model["synthetic_epochs"] >= 1),
              ("train.batch_size", train["batch_size"] >= 1), ("train.learning_rate", train["learning_rate"] > 0),
              ("train.patience", train["patience"] >= 0), ("train.label_smoothing", 0 <= train["label_smoothing"] < 1),
              ("train.weight_decay", train["weight_decay"] >= 0),
              ("train.min_steps", train["min_steps"] >= 0),
              ("train.self_training_rounds", train["self_training_rounds"] >= 0),
              ("train.pseudo_label_confidence", 0 < train["pseudo_label_confidence"] <= 1),
              ("train.batchnorm_images", train["batchnorm_images"] >= 0),
              ("train.augment_shift", 0 <= train["augment_shift"] < 0.5),
              ("train.augment_rotate", 0 <= train["augment_rotate"] <= 45),
              ("train.augment_scale", 0 <= train["augment_scale"] < 0.5),
              ("train.augment_warp", 0 <= train["augment_warp"] < 0.5),
              ("train.augment_blur", 0 <= train["augment_blur"] <= 5),
              ("train.augment_noise", 0 <= train["augment_noise"] <= 0.5)]
    for key, ok in bounds:
        if not ok:
            raise UserError(f"{key} is out of range: {flatten(cfg)[key]!r}")
    if train["self_training"] == "consistency" and not any(v for k, v in train.items() if k.startswith("augment_")):
        raise UserError("train.self_training=consistency needs distorted views: set one of train.augment_* above 0")
    if model["synthetic_scope"] == "machine" and model["synthetic_style"] == "fitted":
        raise UserError("model.synthetic_style=fitted draws like one set's images, so its start cannot be shared: "
                        "set model.synthetic_scope=set, or model.synthetic_style=captcha")
    charset = data["charset"]
    if charset is not None and len(set(charset)) != len(charset):
        raise UserError(f"data.charset must have no repeated characters, got {charset!r}")
    if charset is not None and any(c.isspace() for c in charset):
        raise UserError(f"data.charset must hold no spaces or other blanks, as labels are stripped of them, "
                        f"got {charset!r}")
    if data["label_pattern"] is not None:
        try:
            re.compile(data["label_pattern"])
        except re.error as e:
            raise UserError(f"data.label_pattern is not a valid regular expression: {e}") from None
    weights = model["weights"]
    if weights not in ("imagenet", "none", "synthetic") and not Path(weights).exists():
        raise UserError(f"model.weights: no weights file or run at {weights}")
    from cli import import_keras  # deferred: reading a config should not wait for a backend unless it is valid so far

    if not callable(getattr(import_keras().applications, model["backbone"], None)):
        raise UserError(f"model.backbone {model['backbone']!r} is not a keras.applications model, "
                        f"such as Xception, ResNet50, EfficientNetV2B0 or MobileNetV3Small")


def shipped():
    """The shipped config.yaml's settings, data.length as the code keeps it."""
    defaults = read_yaml(DEFAULTS_PATH)
    defaults["data"]["length"] = parse_length(defaults["data"]["length"])
    return defaults


def load_config(path=None, overrides=()):
    """Defaults from the shipped config.yaml, then the user's file, then --set overrides."""
    defaults = read_yaml(DEFAULTS_PATH)
    cfg = shipped()
    if path is not None and Path(path).resolve() != DEFAULTS_PATH.resolve():
        user = read_yaml(path)
        for section, keys in user.items():
            if not isinstance(keys, dict):
                raise UserError(f"{path}: {section} must be a section of keys")
            for name, value in keys.items():
                apply(cfg, defaults, f"{section}.{name}", value, str(path))
    for text in overrides:
        key, value = parse_override(text, defaults)
        apply(cfg, defaults, key, value, f"--set {text}")
    validate(cfg)
    return cfg
