"""The captcha model: a keras.applications backbone and one softmax head per character.

The model takes raw uint8 pixels: its first layer scales them the way the backbone
expects, so nothing outside it can get the preprocessing wrong. The charset, length,
input size and preprocessing travel inside the saved .keras file (entry captcha.json).
"""
import json
import re
import zipfile
from pathlib import Path

import atomic
from cli import UserError, import_keras
from run import METADATA_ENTRY, model_path, read_metadata

keras = import_keras()
layers = keras.layers

# How each backbone family expects its pixels: (scale, offset) applied to 0..255, per channel.
# Backbones that contain their own preprocessing take the raw range.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING = {
    "minus_one_to_one": ((1 / 127.5,) * 3, (-1.0,) * 3),
    "raw": ((1.0,) * 3, (0.0,) * 3),
    "torch": (tuple(1 / (255 * s) for s in IMAGENET_STD), tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))),
    "caffe": ((1.0,) * 3, (-123.68, -116.779, -103.939)),
}
FAMILIES = [  # first matching prefix wins; everything else (Xception, Inception, MobileNet, ResNetV2) is minus_one_to_one
    (r"EfficientNet|ConvNeXt|MobileNetV3|RegNet", "raw"),
    (r"DenseNet", "torch"),
    (r"(ResNet\d+|VGG\d+)$", "caffe"),
]


# Changed with the layers a head builds, so that a synthetic start cached before is not read into other heads.
HEAD_VERSION = 2


def preprocessing_for(backbone):
    return next((name for pattern, name in FAMILIES if re.match(pattern, backbone)), "minus_one_to_one")


def build_model(image_size, length, num_classes, backbone="Xception", weights="imagenet", dropout=0.5,
                head="attention"):
    """-> (model, initialisation: 'imagenet', 'random' or the weights file's path). Raises
    ImageNetUnavailable where the ImageNet weights are neither in ~/.keras/models nor downloadable.
    head `pooled`: the backbone's features averaged over the image, one dense softmax per position;
    `attention`: see attention_heads."""
    height, width = image_size
    pixels = keras.Input((height, width, 3), dtype="uint8", name="pixels")
    scale, offset = PREPROCESSING[preprocessing_for(backbone)]
    # float32 whatever the policy: pixel values need more than bfloat16's 8 bits of precision.
    scaled = layers.Rescaling(list(scale), list(offset), dtype="float32", name="normalise")(pixels)
    features, initialisation = build_backbone(backbone, weights, scaled, "avg" if head == "pooled" else None)
    if head == "pooled":
        x = layers.Dropout(dropout, name="dropout")(features)
        outputs = [layers.Dense(num_classes, activation="softmax", dtype="float32", name=f"char_{i}")(x)
                   for i in range(1, length + 1)]
    else:
        outputs = attention_heads(features, length, num_classes, dropout)
    return keras.Model(pixels, outputs, name=f"captcha_{backbone.lower()}"), initialisation


def attention_heads(features, length, num_classes, dropout):
    """One softmax per position. One classifier, shared by every position, reads a weighted average of
    the feature map, the weights (where to look) learned per position, so that a letter learned at one
    position is known at all of them. Where the map has fewer cells than characters, some positions
    must look at the same cells, so each position's own classifier also reads the map's plain average,
    as the pooled heads do, and the two readings are summed. float32, as the pooled heads are:
    with_precision keeps every char_ layer's dtype."""
    height, width, channels = features.shape[1:]
    cells = height * width
    where = layers.Conv2D(length, 1, dtype="float32", name="char_where")(features)
    where = layers.Softmax(axis=1, dtype="float32", name="char_where_softmax")(layers.Reshape((cells, length))(where))
    looked_at = layers.Dot(axes=1, dtype="float32", name="char_looked_at")(
        [where, layers.Reshape((cells, channels))(features)])
    logits = layers.Dense(num_classes, dtype="float32", name="char_classes")(
        layers.Dropout(dropout, name="dropout")(looked_at))
    if cells < length:
        pooled = layers.Dropout(dropout, name="pooled_dropout")(layers.GlobalAveragePooling2D(name="pooled")(features))
        own = layers.Reshape((length, num_classes))(
            layers.Dense(length * num_classes, dtype="float32", name="char_positions")(pooled))
        logits = layers.Add(dtype="float32", name="char_logits")([logits, own])
    return [layers.Activation("softmax", dtype="float32", name=f"char_{i + 1}")(
                layers.Reshape((num_classes,))(layers.Cropping1D((i, length - 1 - i))(logits)))
            for i in range(length)]


def head_layers(model):
    """The names of the heads' layers with weights: where two models' are alike, one's heads can be copied
    into the other."""
    return sorted(layer.name for layer in model.layers if layer.weights and layer.name.startswith("char_"))


def copy_weights(source, target, heads):
    """Copies the weights of source, a model made by build_model with the same backbone, into target,
    layer by layer in order; the heads (char_N) too when `heads`. The input sizes may differ: no
    weight depends on them."""
    def body(model):
        return [layer for layer in model.layers if layer.weights and not layer.name.startswith("char_")]

    for mine, theirs in zip(body(target), body(source), strict=True):
        mine.set_weights(theirs.get_weights())
    if heads:
        for name in head_layers(target):
            target.get_layer(name).set_weights(source.get_layer(name).get_weights())


class ImageNetUnavailable(UserError):
    pass


def build_backbone(backbone, weights, inputs, pooling="avg"):
    """Passing the input as a tensor skips keras.applications' minimum-size check (71 for
    Xception): the network only needs each side to survive its 32x downsampling."""
    application = getattr(keras.applications, backbone)
    source = None if weights == "none" else weights
    if source not in (None, "imagenet") and not Path(source).is_file():
        raise UserError(f"model.weights: no weights file at {source}")
    try:
        network = application(include_top=False, weights=source, input_tensor=inputs, pooling=pooling)
    except (ValueError, OSError) as e:
        reason = str(e).splitlines()[0]
        if source not in (None, "imagenet"):
            raise UserError(f"model.weights: {source} does not fit {backbone}: {reason}") from None
        raise UserError(f"model.backbone {backbone} cannot be built for input {tuple(inputs.shape[1:3])}: "
                        f"{reason}") from None
    except Exception as e:
        # keras.utils.get_file (Keras 3.15) raises a bare Exception when a download fails, and Keras has no
        # public way to fetch an application's weights apart from building it: with the ImageNet weights
        # asked for, any other failure is theirs.
        if source != "imagenet":
            raise
        url = re.search(r"https?://\S+?(?=[:\s]|$)", str(e))
        message = (f"could not download the ImageNet weights of {backbone} ({str(e).splitlines()[0][-160:]}). "
                   f"To use them offline, fetch {url.group(0) if url else 'the weights file'} on a machine with "
                   f"network and put it in ~/.keras/models/, or set model.weights to its path")
        raise ImageNetUnavailable(message) from None
    for layer in network.layers:
        layer.trainable = True
    return network.output, source and (source if source == "imagenet" else str(Path(source).resolve())) or "random"


def recompute_batchnorm(model, images, batch_size):
    """Sets every BatchNormalization layer's moving statistics to the average of its batch
    statistics over `images`, in training mode ("precise BN", as in pycls and Detectron).

    During training, inference reads exponential moving averages (momentum 0.99) of statistics
    that were computed under earlier weights. While the weights move fast, as they do from
    random initialisation or on a small set, those averages trail far behind, and the model that
    inference sees reads nothing right. No weight other than the statistics changes."""
    norms = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    batch_size = min(batch_size, len(images))
    try:
        for count, start in enumerate(range(0, len(images) - batch_size + 1, batch_size), 1):
            for layer in norms:
                layer.momentum = 1 - 1 / count  # a running mean: every batch weighs the same
            model(images[start:start + batch_size], training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum


# ---------------------------------------------------------------- precision

def resolve_precision(precision="auto"):
    """`auto`: float16 on a GPU, bfloat16 on a CPU that computes it natively, else float32."""
    if precision != "auto":
        return precision
    if has_gpu():
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_has_native_bfloat16() else "float32"


def inference_precision(precision, trained):
    """`auto` for reading: the precision the model was trained in, when this machine would train in
    it too or it is float32, so that train.py's held-out score and evaluate.py's agree to the image;
    otherwise (a model trained in float16 on a GPU, read on a CPU) what this machine computes best."""
    if precision != "auto":
        return precision
    here = resolve_precision("auto")
    return trained if trained in (here, "float32") else here


def has_gpu():
    if keras.backend.backend() == "torch":
        import torch

        return torch.cuda.is_available()
    return any(device.startswith("gpu") for device in keras.distribution.list_devices())


def cpu_has_native_bfloat16():
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(re.findall(r"\S+", " ".join(re.findall(r"^(?:flags|Features)\s*:(.*)$", cpuinfo, re.M))))
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def with_precision(model, policy):
    """A copy of model computing in `policy`. The input scaling and the softmax heads stay float32."""
    def clone(layer):
        config = layer.get_config()
        if "dtype" in config and layer.name != "normalise" and not layer.name.startswith("char_"):
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return keras.Model(copy.inputs, copy.outputs, name=model.name)  # clone_model also copies the optimizer


# ---------------------------------------------------------------- saving and loading

def save_model(model, path, metadata):
    """Saves model and metadata as one .keras file (atomic.replacing: never half a model)."""
    with atomic.replacing(path) as partial:
        model.save(partial)
        with zipfile.ZipFile(partial, "a") as archive:
            archive.writestr(METADATA_ENTRY, json.dumps(metadata, indent=2))


def load_model(path):
    """-> (float32 Keras model, metadata). Loads in Keras's safe mode: no code from the file runs."""
    metadata = read_metadata(path)
    path = model_path(path)
    if path.suffix != ".keras":
        raise UserError(f"{path} is not a .keras file")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except (ValueError, TypeError, OSError) as e:
        raise UserError(f"{path} could not be loaded by Keras {keras.__version__}: {str(e).splitlines()[0]}") from None
    return model, metadata
