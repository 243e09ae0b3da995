"""Keras 3 models built from a :class:`~server.training.spec.ModelSpec`.

What always holds: the same spec, schema and seed build the same initial weights
(:func:`keras.utils.set_random_seed` is called first), and a model uses only layers
that TensorFlow Lite converts to builtin ops (Conv1D/Conv2D, max-pooling, Dense,
Dropout, Flatten, BatchNormalization, ReLU, softmax, and a final affine rescale for
regression), so every target profile can take it without select-TF ops.

The input is named ``features`` and has the dataset's per-sample ``input_shape``
(after preprocessing); the output layer is named ``output``: class probabilities
(softmax) for classification, the target in its own units for regression.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ notices

import keras

from server.datasets.types import DatasetSchema
from server.training.spec import ModelSpec, check_fits

__all__ = ["build_model"]


def _hidden(x: keras.KerasTensor, layer: keras.layers.Layer, spec: ModelSpec) -> keras.KerasTensor:
    x = layer(x)
    if spec.batch_norm:
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    if spec.dropout > 0:
        x = keras.layers.Dropout(spec.dropout)(x)
    return x


def build_model(
    spec: ModelSpec,
    schema: DatasetSchema,
    *,
    target_mean: float = 0.0,
    target_std: float = 1.0,
) -> keras.Model:
    """A compiled model for ``spec`` on data shaped like ``schema``.

    For regression, ``target_mean`` and ``target_std`` (from the training targets) make
    the last layer ``y = z * std + mean``: the network learns a standardised target,
    while the model -- and every artifact converted from it -- predicts in real units.
    """
    check_fits(spec, schema)
    keras.utils.set_random_seed(spec.seed)
    use_bias = not spec.batch_norm  # batch norm's beta is the bias
    inputs = keras.Input(shape=tuple(schema.input_shape), name="features")
    x = inputs
    if spec.arch == "mlp":
        if len(schema.input_shape) > 1:
            x = keras.layers.Flatten()(x)
        for units in spec.hidden_units:
            x = _hidden(x, keras.layers.Dense(units, use_bias=use_bias), spec)
    else:
        conv = keras.layers.Conv2D if spec.arch == "cnn2d" else keras.layers.Conv1D
        pool = keras.layers.MaxPooling2D if spec.arch == "cnn2d" else keras.layers.MaxPooling1D
        for index, filters in enumerate(spec.filters):
            layer = conv(filters, spec.kernel_size, padding="same", use_bias=use_bias)
            x = _hidden(x, layer, spec)
            if index < len(spec.filters) - 1:
                x = pool(2)(x)
        x = keras.layers.Flatten()(x)
        if spec.dense_units:
            x = _hidden(x, keras.layers.Dense(spec.dense_units, use_bias=use_bias), spec)

    optimizer = keras.optimizers.Adam(learning_rate=spec.learning_rate)
    if schema.task == "classification":
        classes = len(schema.class_names or [])
        outputs = keras.layers.Dense(classes, activation="softmax", name="output")(x)
        model = keras.Model(inputs, outputs, name=f"{spec.arch}_classifier")
        model.compile(
            optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
    else:
        z = keras.layers.Dense(1, name="standardised")(x)
        scale = target_std if target_std > 0 else 1.0
        outputs = keras.layers.Rescaling(scale=scale, offset=target_mean, name="output")(z)
        model = keras.Model(inputs, outputs, name=f"{spec.arch}_regressor")
        model.compile(
            optimizer=optimizer,
            loss="mse",
            metrics=[
                keras.metrics.RootMeanSquaredError(name="rmse"),
                keras.metrics.MeanAbsoluteError(name="mae"),
            ],
        )
    return model
