"""Random distortions of training captchas, computed on the device inside the training step.

Keras layers, in keras.ops, so that it runs on whatever device and backend trains: the loader
hands over uint8 pixels only. It is active in training alone, and train.py puts it in front of the
model it fits, never in the model it saves.
"""
import numpy as np

from cli import import_keras

keras = import_keras()
ops = keras.ops

MESH = (2, 4)  # rows, columns of the mesh whose inner corners a warp moves


@keras.saving.register_keras_serializable(package="captcha")
class Distortion(keras.layers.Layer):
    """Random changes of the kind one site's captchas differ by, each image its own: moved by up to
    `shift` of its size, turned by up to `rotate` degrees, scaled by up to `scale`, warped by moving the
    inner corners of a 2x4 mesh by up to `warp` of a cell (a smooth displacement field, zero on the
    outline), blurred with a Gaussian of radius up to `blur` pixels, and given Gaussian noise of up to
    `noise` x 255. Pixels brought in from outside the frame take the median colour of its border.
    uint8 in, uint8 out."""

    def __init__(self, shift=0.0, rotate=0.0, scale=0.0, warp=0.0, blur=0.0, noise=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.shift, self.rotate, self.scale, self.warp, self.blur, self.noise = shift, rotate, scale, warp, blur, noise
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def get_config(self):
        return {**super().get_config(), "shift": self.shift, "rotate": self.rotate, "scale": self.scale,
                "warp": self.warp, "blur": self.blur, "noise": self.noise, "seed": self.seed}

    def compute_output_shape(self, input_shape):
        return input_shape

    def uniform(self, shape, bound):
        return keras.random.uniform(shape, -bound, bound, seed=self.seed_generator)

    def call(self, pixels, training=None):
        if not training:
            return pixels
        count = ops.shape(pixels)[0]
        x = self.resampled(ops.cast(pixels, "float32"), count)
        if self.blur:
            x = self.blurred(x, count)
        if self.noise:
            strength = (keras.random.uniform((count, 1, 1, 1), 0, self.noise, seed=self.seed_generator) * 255)
            x = x + keras.random.normal(ops.shape(x), seed=self.seed_generator) * strength
        return ops.cast(ops.clip(ops.round(x), 0, 255), "uint8")

    def resampled(self, x, count):
        """Each output pixel reads, bilinearly, the point that the warp, then the inverse of the turn, zoom
        and move, bring it to: the two in one resampling."""
        height, width = x.shape[1], x.shape[2]
        rows, cols = MESH
        gx = ops.convert_to_tensor(np.arange(width, dtype="float32") + 0.5)[None, None, :]
        gy = ops.convert_to_tensor(np.arange(height, dtype="float32") + 0.5)[None, :, None]
        points_x, points_y = gx + ops.zeros((count, height, 1)), gy + ops.zeros((count, 1, width))
        if self.warp:
            inner = np.zeros((rows + 1, cols + 1, 2), "float32")
            inner[1:-1, 1:-1] = (width / cols, height / rows)
            corners = self.uniform((count, rows + 1, cols + 1, 2), self.warp) * inner
            moved = ops.einsum("hr,nrcd,wc->nhwd", interpolation(height, rows), corners, interpolation(width, cols))
            points_x, points_y = points_x + moved[..., 0], points_y + moved[..., 1]
        angle = self.uniform((count,), np.radians(self.rotate))[:, None, None]
        zoom = 1 + self.uniform((count,), self.scale)[:, None, None]
        dx = (self.uniform((count,), self.shift) * width)[:, None, None]
        dy = (self.uniform((count,), self.shift) * height)[:, None, None]
        cos, sin = ops.cos(angle) / zoom, ops.sin(angle) / zoom
        cx, cy = width / 2, height / 2
        source_x = cos * (points_x - cx - dx) + sin * (points_y - cy - dy) + cx
        source_y = -sin * (points_x - cx - dx) + cos * (points_y - cy - dy) + cy
        return bilinear(x, source_x - 0.5, source_y - 0.5, border_colour(x))

    def blurred(self, x, count):
        """A Gaussian blur of each image's own radius, as two products with per-image matrices whose rows
        are the normalised Gaussian weights: exact at the edges, where the weights left are renormalised."""
        sigma = ops.maximum(keras.random.uniform((count,), 0, self.blur, seed=self.seed_generator), 1e-3)

        def gaussian(size):
            distance = np.subtract.outer(np.arange(size), np.arange(size)).astype("float32") ** 2
            weights = ops.exp(-ops.convert_to_tensor(distance)[None] / (2 * sigma[:, None, None] ** 2))
            return weights / ops.sum(weights, axis=-1, keepdims=True)

        x = ops.einsum("nvw,nhwc->nhvc", gaussian(x.shape[2]), x)
        return ops.einsum("nuh,nhwc->nuwc", gaussian(x.shape[1]), x)


def interpolation(size, cells):
    """size x (cells + 1) weights that spread the values at a mesh's cells + 1 corners linearly over
    size pixel centres."""
    position = (np.arange(size) + 0.5) / size * cells
    left = np.minimum(np.floor(position).astype(int), cells - 1)
    weights = np.zeros((size, cells + 1), "float32")
    weights[np.arange(size), left] = 1 - (position - left)
    weights[np.arange(size), left + 1] = position - left
    return ops.convert_to_tensor(weights)


def border_colour(x):
    """Each image's median colour along its outline -> N x 3."""
    border = ops.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
    return ops.median(border, axis=1)


def bilinear(x, source_x, source_y, fill):
    """x (N x H x W x C) read at the points (source_x, source_y), N x H x W each, in pixel indices; points
    off the image read `fill` (N x C)."""
    count, height, width, channels = ops.shape(x)[0], x.shape[1], x.shape[2], x.shape[3]
    flat = ops.reshape(x, (-1, channels))
    base = ops.arange(count, dtype="int32")[:, None, None] * (height * width)
    left, top = ops.floor(source_x), ops.floor(source_y)
    right_share, bottom_share = source_x - left, source_y - top
    left, top = ops.cast(left, "int32"), ops.cast(top, "int32")
    result = 0
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        column, row = left + dx, top + dy
        inside = (column >= 0) & (column < width) & (row >= 0) & (row < height)
        index = base + ops.clip(row, 0, height - 1) * width + ops.clip(column, 0, width - 1)
        value = ops.where(inside[..., None], ops.take(flat, index, axis=0), fill[:, None, None, :])
        share = (right_share if dx else 1 - right_share) * (bottom_share if dy else 1 - bottom_share)
        result = result + share[..., None] * value
    return result


def distortion(train_settings, seed, name="distortion"):
    """The Distortion layer of a config's train section, or None when every distortion is off."""
    settings = {name: train_settings[f"augment_{name}"] for name in ("shift", "rotate", "scale", "warp", "blur", "noise")}
    return Distortion(**settings, seed=seed, name=name, dtype="float32") if any(settings.values()) else None


def training_model(model, distortion_layer):
    """The model to fit: the distortions in front of `model`, whose layers (and so weights) it shares;
    outputs named as model's, so that losses and logs keep their names."""
    pixels = keras.Input(model.inputs[0].shape[1:], dtype=model.inputs[0].dtype, name="pixels")
    outputs = model(distortion_layer(pixels) if distortion_layer else pixels)
    return keras.Model(pixels, [keras.layers.Identity(name=name)(output)
                                for name, output in zip(model.output_names, outputs)], name=f"{model.name}_training")


# Consistency training's strong view: each distortion this many times the weak view's, so that the two differ
# as FixMatch's weak and strong augmentations do, yet each within the bound that keeps a captcha readable.
STRONG = 3.0
STRONG_BOUNDS = {"augment_shift": 0.2, "augment_rotate": 30.0, "augment_scale": 0.3, "augment_warp": 0.45,
                 "augment_blur": 3.0, "augment_noise": 0.2}


@keras.saving.register_keras_serializable(package="captcha")
class SplitViews(keras.layers.Layer):
    """The heads' outputs over one batch of [labelled, unlabelled weak view, unlabelled strong view] ->
    the labelled images' heads, and the unlabelled images' two views as one [count, 2, positions, classes]."""

    def __init__(self, classes, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes

    def get_config(self):
        return {**super().get_config(), "classes": self.classes}

    def compute_output_shape(self, heads_shape, labelled_shape):
        return (*[(None, self.classes)] * len(heads_shape), (None, 2, len(heads_shape), self.classes))

    def call(self, heads, labelled):
        count = ops.shape(labelled)[0]
        views = ops.stack([head[count:] for head in heads], axis=1)
        half = ops.shape(views)[0] // 2
        return (*[head[:count] for head in heads], ops.stack([views[:half], views[half:]], axis=1))


def consistency_model(model, train_settings, seed):
    """The model to fit for consistency training (FixMatch): labelled captchas through the weak
    distortions, unlabelled ones twice, through the weak and the strong distortions, all in one batch
    so that BatchNorm sees them together. Outputs: model's heads for the labelled captchas, named as
    model's, and `consistency`, the unlabelled captchas' two views (see ConsistencyLoss)."""
    shape, dtype = model.inputs[0].shape[1:], model.inputs[0].dtype
    labelled = keras.Input(shape, dtype=dtype, name="pixels")
    unlabelled = keras.Input(shape, dtype=dtype, name="unlabelled")
    weak = distortion(train_settings, seed)
    strong = distortion({**train_settings, **{key: min(train_settings[key] * STRONG, bound)
                                              for key, bound in STRONG_BOUNDS.items()}}, seed + 1, "strong_distortion")
    batch = keras.layers.Concatenate(axis=0)([weak(labelled), weak(unlabelled), strong(unlabelled)])
    *heads, views = SplitViews(model.outputs[0].shape[-1], dtype="float32")(model(batch), labelled)
    outputs = [keras.layers.Identity(name=name)(head) for name, head in zip(model.output_names, heads)]
    return keras.Model({"pixels": labelled, "unlabelled": unlabelled},
                       [*outputs, keras.layers.Identity(name="consistency")(views)], name=f"{model.name}_consistency")


def sure(weak, threshold):
    """1 where the weak view's reading is sure: its positions' top probabilities multiply to threshold or more."""
    return ops.cast(ops.prod(ops.max(weak, axis=-1), axis=-1) >= threshold, "float32")


@keras.saving.register_keras_serializable(package="captcha")
class ConsistencyLoss(keras.losses.Loss):
    """FixMatch's loss on unlabelled captchas, over consistency_model's two views: where the weak view's
    reading is sure, the strong view's cross-entropy against that reading, summed over the positions;
    0 elsewhere. The weak view passes no gradient. y_true is not read."""

    def __init__(self, threshold, name="consistency", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        weak = ops.stop_gradient(y_pred[:, 0])
        reading = ops.one_hot(ops.argmax(weak, axis=-1), ops.shape(weak)[-1])
        cross_entropy = -ops.sum(reading * ops.log(ops.clip(y_pred[:, 1], 1e-7, 1.0)), axis=(1, 2))
        return sure(weak, self.threshold) * cross_entropy


@keras.saving.register_keras_serializable(package="captcha")
class SureShare(keras.metrics.MeanMetricWrapper):
    """The share of unlabelled captchas whose weak view is read surely, so that they are trained on."""

    def __init__(self, threshold, name="sure", **kwargs):
        super().__init__(lambda y_true, y_pred: sure(y_pred[:, 0], threshold), name=name, **kwargs)
        self.threshold = threshold

    def get_config(self):
        return {"threshold": self.threshold, "name": self.name}
