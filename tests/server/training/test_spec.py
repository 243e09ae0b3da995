from __future__ import annotations

import pytest

from server.datasets.types import DatasetSchema
from server.training.spec import (
    MAX_PARAMETERS,
    ModelSpec,
    SpecError,
    check_fits,
    default_arch,
    default_spec,
    parameter_count,
    spec_with_overrides,
)
from tests.server.training.conftest import (
    digits_schema,
    regression_data,
    vibration_data,
)


def tabular_schema(features: int = 10) -> DatasetSchema:
    return DatasetSchema(
        task="classification",
        label="y",
        feature_names=[f"f{i}" for i in range(features)],
        feature_dtypes=["float64"] * features,
        input_shape=[features],
        class_names=["a", "b", "c"],
        rows=100,
    )


def test_a_spec_takes_its_architectures_defaults() -> None:
    assert ModelSpec(arch="cnn2d").filters == [32, 64]
    assert ModelSpec(arch="cnn2d").hidden_units == []
    assert ModelSpec(arch="mlp").hidden_units == [64, 32]
    assert ModelSpec(arch="mlp", hidden_units=[]).hidden_units == []  # a linear model
    assert ModelSpec.model_validate_json(ModelSpec(arch="cnn1d").model_dump_json()) == ModelSpec(
        arch="cnn1d"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"epochs": 0}, "greater than or equal to 1"),
        ({"epochs": 501}, "less than or equal to 500"),
        ({"k_folds": 1}, "greater than or equal to 2"),
        ({"k_folds": 11}, "less than or equal to 10"),
        ({"learning_rate": 0}, "greater than 0"),
        ({"dropout": 1.0}, "less than 1"),
        ({"optimizer": "sgd"}, "Extra inputs are not permitted"),
        ({"arch": "transformer"}, "'mlp', 'cnn1d' or 'cnn2d'"),
        ({"arch": "mlp", "filters": [8]}, "an mlp uses hidden_units"),
        ({"arch": "mlp", "dense_units": 8}, "an mlp uses hidden_units"),
        ({"arch": "cnn2d", "filters": []}, "at least one convolution block"),
        ({"arch": "cnn1d", "hidden_units": [8]}, "cnn1d uses filters and dense_units"),
        ({"arch": "mlp", "hidden_units": [0]}, "1 to 4096 units"),
    ],
)
def test_invalid_specs_are_refused(fields: dict[str, object], message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        ModelSpec.model_validate(fields)


@pytest.mark.parametrize(
    ("arch", "schema", "message"),
    [
        ("cnn2d", tabular_schema(), r"cnn2d needs a 3-D input shape .* input_shape is \[10\]"),
        ("cnn1d", digits_schema(), r"cnn1d needs a 2-D input shape .* \[8, 8, 1\]; use --arch"),
        ("cnn2d", vibration_data().schema, r"cnn2d needs a 3-D .* use --arch cnn1d"),
    ],
)
def test_an_architecture_must_fit_the_input_shape(
    arch: str, schema: DatasetSchema, message: str
) -> None:
    with pytest.raises(SpecError, match=message) as caught:
        check_fits(ModelSpec(arch=arch), schema)  # type: ignore[arg-type]
    assert caught.value.status_code == 422


def test_mlp_fits_any_shape() -> None:
    for schema in (tabular_schema(), digits_schema(), vibration_data().schema):
        check_fits(ModelSpec(arch="mlp"), schema)


def test_too_many_pooling_blocks_for_a_small_input() -> None:
    with pytest.raises(SpecError, match=r"too small; use at most 4 blocks"):
        check_fits(ModelSpec(arch="cnn2d", filters=[8, 8, 8, 8, 8]), digits_schema())
    check_fits(ModelSpec(arch="cnn2d", filters=[8, 8, 8, 8]), digits_schema())


def test_model_size_is_bounded() -> None:
    huge = ModelSpec(arch="mlp", hidden_units=[4096] * 3)
    wide = tabular_schema(2000)
    assert parameter_count(huge, wide) > MAX_PARAMETERS
    with pytest.raises(SpecError, match="over the limit"):
        check_fits(huge, wide)


def test_default_architecture_follows_the_input_shape() -> None:
    assert default_arch(digits_schema()) == "cnn2d"
    assert default_arch(vibration_data().schema) == "cnn1d"
    assert default_arch(tabular_schema()) == "mlp"


def test_the_digits_reference_cnn_has_over_100k_parameters() -> None:
    spec = default_spec("cnn2d", digits_schema())
    assert spec.arch == "cnn2d" and spec.epochs <= 15
    assert parameter_count(spec, digits_schema()) >= 100_000


def test_defaults_adapt_to_tiny_inputs() -> None:
    tiny = DatasetSchema(
        task="classification",
        label="y",
        feature_names=["a", "b", "c", "d"],
        feature_dtypes=["float64"] * 4,
        input_shape=[2, 2, 1],
        class_names=["n", "y"],
        rows=10,
    )
    spec = default_spec("cnn2d", tiny)
    assert spec.filters == [32, 64]
    check_fits(spec, tiny)


@pytest.mark.parametrize(
    "schema",
    [digits_schema(), vibration_data().schema, regression_data().schema, tabular_schema()],
    ids=["digits", "vibration", "regression", "tabular"],
)
def test_parameter_count_matches_keras(schema: DatasetSchema) -> None:
    from server.training.keras_models import build_model

    archs = ["mlp", *{3: ["cnn2d"], 2: ["cnn1d"]}.get(len(schema.input_shape), [])]
    for arch in archs:
        for spec in (
            default_spec(arch, schema),  # type: ignore[arg-type]
            default_spec(arch, schema).model_copy(update={"batch_norm": True}),  # type: ignore[arg-type]
        ):
            assert parameter_count(spec, schema) == build_model(spec, schema).count_params()


def test_overrides_are_validated_with_clear_messages() -> None:
    spec = spec_with_overrides("cnn2d", digits_schema(), {"epochs": 3, "seed": 7})
    assert (spec.arch, spec.epochs, spec.seed, spec.filters) == ("cnn2d", 3, 7, [32, 64])
    assert spec_with_overrides(None, digits_schema()).arch == "cnn2d"
    with pytest.raises(SpecError, match=r"invalid model spec: epochs: .*less than or equal to 500"):
        spec_with_overrides("mlp", digits_schema(), {"epochs": 1000})
    with pytest.raises(SpecError, match=r"invalid model spec: momentum: Extra inputs"):
        spec_with_overrides("mlp", digits_schema(), {"momentum": 0.9})
    with pytest.raises(SpecError, match="overrides say 'mlp'"):
        spec_with_overrides("cnn2d", digits_schema(), {"arch": "mlp"})
    with pytest.raises(SpecError, match="3-D input shape"):
        spec_with_overrides("cnn2d", tabular_schema())
