"""Parsing and validating uploads: CSV quirks, NPZ shapes, and every problem named."""

from __future__ import annotations

import gzip
import io
import zipfile

import numpy as np
import pytest

from server.datasets.ingest import (
    DatasetInvalidError,
    IngestLimits,
    ParsedDataset,
    from_arrays,
    parse_csv,
    parse_npz,
    parse_upload,
    read_limited,
)
from server.errors import InvalidInputError


def csv_bytes(header: str, rows: list[str], *, newline: str = "\n", trailing: bool = True) -> bytes:
    text = newline.join([header, *rows]) + (newline if trailing else "")
    return text.encode()


def two_class_rows(n: int = 20) -> list[str]:
    return [f"{i},{i * 0.5},{'cat' if i % 2 else 'dog'}" for i in range(n)]


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def problems_of(excinfo: pytest.ExceptionInfo[DatasetInvalidError]) -> list[str]:
    return excinfo.value.problems


# ----------------------------------------------------------------------------- CSV that parses


def test_csv_with_string_labels() -> None:
    parsed = parse_csv(csv_bytes("a,b,animal", two_class_rows()), label="animal")
    schema = parsed.schema
    assert schema.task == "classification"
    assert schema.feature_names == ["a", "b"]
    assert schema.feature_dtypes == ["int64", "float64"]
    assert schema.input_shape == [2]
    assert schema.class_names == ["cat", "dog"]
    assert schema.rows == 20
    assert parsed.x.dtype == np.float32 and parsed.x.shape == (20, 2)
    assert parsed.y.dtype == np.int64
    assert parsed.y[:4].tolist() == [1, 0, 1, 0]  # dog, cat, dog, cat
    assert parsed.source_format == "csv"


def test_csv_quirks_quoted_fields_bom_crlf_and_no_trailing_newline() -> None:
    quoted = ['"a, b"', '"say ""hi"""']  # a separator and doubled quotes inside quotes
    rows = [f'{i},"{i}.5",{quoted[i % 2]}' for i in range(20)]
    data = b"\xef\xbb\xbf" + csv_bytes(
        '"first, col",second,"label"', rows, newline="\r\n", trailing=False
    )
    parsed = parse_csv(data, label="label")
    assert parsed.schema.feature_names == ["first, col", "second"]
    assert parsed.schema.class_names == ["a, b", 'say "hi"']
    assert parsed.y[:2].tolist() == [0, 1]
    assert parsed.x[1].tolist() == [1.0, 1.5]


def test_csv_blank_lines_spaces_semicolons_and_tabs() -> None:
    rows = [f" {i} ; {i % 3} ; {'yes' if i % 2 else 'no'} " for i in range(20)]
    semicolons = ("a;b;y\n" + "\n".join(rows) + "\n\n;;\n\n").encode()
    parsed = parse_csv(semicolons, label="y")
    assert parsed.schema.feature_names == ["a", "b"] and parsed.schema.rows == 20
    tabs = parse_csv(semicolons.replace(b";", b"\t"), label="y")
    assert tabs.content_sha256 == parsed.content_sha256


def test_csv_missing_values_below_the_limit_stay_nan() -> None:
    rows = [f"{'' if i == 3 else i},{'NA' if i == 5 else i},{i % 2}" for i in range(40)]
    parsed = parse_csv(csv_bytes("a,b,y", rows), label="y")
    assert np.isnan(parsed.x[3, 0]) and np.isnan(parsed.x[5, 1])
    assert np.isnan(parsed.x).sum() == 2


def test_csv_booleans_are_features() -> None:
    rows = [f"{'true' if i % 3 else 'FALSE'},{i % 2}" for i in range(20)]
    parsed = parse_csv(csv_bytes("flag,y", rows), label="y")
    assert parsed.schema.feature_dtypes == ["bool"]
    assert parsed.x[:3, 0].tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("labels", "task", "class_names"),
    [
        ([i % 3 for i in range(30)], "classification", ["0", "1", "2"]),
        ([(i % 3) * 5 - 5 for i in range(30)], "classification", ["-5", "0", "5"]),
        ([i * 0.37 for i in range(30)], "regression", None),
        ([i for i in range(60)], "regression", None),  # whole numbers, but 60 distinct
    ],
)
def test_task_inference(labels: list[float], task: str, class_names: list[str] | None) -> None:
    rows = [f"{i},{v}" for i, v in enumerate(labels)]
    parsed = parse_csv(csv_bytes("a,target", rows), label="target")
    assert parsed.schema.task == task
    assert parsed.schema.class_names == class_names
    if task == "regression":
        assert parsed.y.dtype == np.float32
        assert np.allclose(parsed.y, labels)


def test_numeric_class_names_sort_numerically_and_merge_notations() -> None:
    rows = [f"{i},{['10', '9.0', '9', '100'][i % 4]}" for i in range(40)]
    parsed = parse_csv(csv_bytes("a,y", rows), label="y")
    assert parsed.schema.class_names == ["9", "10", "100"]
    assert np.bincount(parsed.y).tolist() == [20, 10, 10]


def test_a_given_task_wins() -> None:
    rows = [f"{i},{i % 3}" for i in range(30)]
    parsed = parse_csv(csv_bytes("a,y", rows), label="y", task="regression")
    assert parsed.schema.task == "regression" and parsed.schema.class_names is None


# ----------------------------------------------------------------------------- CSV problems


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "the file is empty"),
        (b"\n\n  \n", "the file is empty"),
        (b"\xef\xbb\xbf", "the file is empty"),
        (b"a,b,y\n", "the file has a header but no data rows"),
        (gzip.compress(b"a,y\n1,2\n"), "gzip-compressed"),
        (b"a,y\n1,\xff\xfe\n", "not UTF-8"),
    ],
)
def test_unreadable_files(data: bytes, expected: str) -> None:
    with pytest.raises(DatasetInvalidError) as excinfo:
        parse_csv(data, label="y")
    assert any(expected in p for p in problems_of(excinfo)), problems_of(excinfo)


def test_missing_label_column_is_named_with_a_hint() -> None:
    with pytest.raises(DatasetInvalidError) as excinfo:
        parse_csv(csv_bytes("a,b,Animal", two_class_rows()), label="animal")
    problem, *rest = problems_of(excinfo)
    assert "no column named 'animal'" in problem and "did you mean 'Animal'" in problem
    assert rest == ["feature 'Animal' is not numeric: 20 values such as 'dog' (line 2)"]


def test_non_numeric_feature_is_named_with_an_example() -> None:
    rows = [f"{'red' if i == 4 else i},{i},{i % 2}" for i in range(20)]
    with pytest.raises(DatasetInvalidError) as excinfo:
        parse_csv(csv_bytes("color,b,y", rows), label="y")
    (problem,) = problems_of(excinfo)
    assert "feature 'color' is not numeric" in problem
    assert "'red'" in problem and "line 6" in problem


def test_nan_share_above_the_limit() -> None:
    rows = [f"{'' if i < 3 else i},{i},{i % 2}" for i in range(20)]  # 15 % missing
    with pytest.raises(DatasetInvalidError) as excinfo:
        parse_csv(csv_bytes("a,b,y", rows), label="y")
    (problem,) = problems_of(excinfo)
    assert "feature 'a' is 15.0% missing" in problem and "5.0%" in problem
    relaxed = parse_csv(csv_bytes("a,b,y", rows), label="y", limits=IngestLimits(max_nan_share=0.2))
    assert np.isnan(relaxed.x[:, 0]).sum() == 3


def test_too_few_rows_per_class() -> None:
    rows = [f"{i},{'rare' if i < 2 else 'common'}" for i in range(20)]
    with pytest.raises(DatasetInvalidError) as excinfo:
        parse_csv(csv_bytes("a,y", rows), label="y")
    (problem,) = problems_of(excinfo)
    assert "class 'rare' has 2 rows" in problem and "at least 5" in problem


def test_file_over_the_size_limit_is_refused_while_reading() -> None:
    class CountingStream(io.BytesIO):
        read_total = 0

        def read(self, size: int | None = -1) -> bytes:
            chunk = super().read(size)
            self.read_total += len(chunk)
            return chunk

    stream = CountingStream(csv_bytes("a,y", [f"{i},{i % 2}" for i in range(100_000)]))
    with pytest.raises(DatasetInvalidError) as excinfo:
        parse_upload(stream, label="y", limits=IngestLimits(max_bytes=1000))
    assert problems_of(excinfo) == ["the file is larger than the limit of 1000 bytes"]
    assert stream.read_total == 1001
    assert read_limited(io.BytesIO(b"x" * 1000), max_bytes=1000) == b"x" * 1000


@pytest.mark.parametrize(
    ("header", "rows", "expected"),
    [
        (
            "a,y",
            [f"{i},{'' if i == 7 else i % 2}" for i in range(20)],
            "missing in 1 rows (line 9)",
        ),
        ("a,y", [f"{i},1" for i in range(20)], "only one class ('1')"),
        ("a,y", [f"{'inf' if i == 2 else i},{i % 2}" for i in range(20)], "1 infinite value"),
        ("a,y", [f"{i},{i % 2}" for i in range(6)], "at least 10 are needed"),
        ("a,a,y", [f"{i},{i},{i % 2}" for i in range(20)], "more than once: 'a'"),
        ("a,,y", [f"{i},{i},{i % 2}" for i in range(20)], "column 2 has no name"),
        ("y", [str(i % 2) for i in range(20)], "no feature columns besides the label"),
        (
            "a,y",
            [f"{i},{i % 2}" for i in range(20)] + ["1,2,3"],
            "1 row has a different number of values than the header's 2 columns (line 22",
        ),
    ],
)
def test_each_problem_is_named(header: str, rows: list[str], expected: str) -> None:
    with pytest.raises(DatasetInvalidError) as excinfo:
        parse_csv(csv_bytes(header, rows), label="y")
    assert any(expected in p for p in problems_of(excinfo)), problems_of(excinfo)


def test_regression_with_text_labels_is_refused() -> None:
    with pytest.raises(DatasetInvalidError) as excinfo:
        parse_csv(csv_bytes("a,b,y", two_class_rows()), label="y", task="regression")
    assert "regression needs a numeric label" in problems_of(excinfo)[0]


def test_every_problem_is_reported_at_once() -> None:
    rows = [f"{'' if i < 5 else i},{'blue' if i == 2 else i},{i}" for i in range(20)]
    rows.append("1,2")
    with pytest.raises(DatasetInvalidError) as excinfo:
        parse_csv(csv_bytes("a,b,c", rows), label="label")
    problems = problems_of(excinfo)
    assert len(problems) == 4
    assert "no column named 'label'" in problems[0]
    assert "different number of values" in problems[1]
    assert "feature 'b' is not numeric" in problems[2]
    assert "feature 'a' is 25.0% missing" in problems[3]
    message = str(excinfo.value)
    assert message.startswith("the dataset was refused, 4 problems: (1) ")
    assert all(p in message for p in problems)
    assert isinstance(excinfo.value, InvalidInputError) and excinfo.value.status_code == 422


def test_many_problems_of_one_kind_are_capped_with_a_count() -> None:
    header = ",".join(f"f{j}" for j in range(30)) + ",y"
    rows = [",".join(["x"] * 30) + f",{i % 2}" for i in range(20)]
    with pytest.raises(DatasetInvalidError) as excinfo:
        parse_csv(csv_bytes(header, rows), label="y")
    problems = problems_of(excinfo)
    assert len(problems) == 21 and problems[-1] == "... and 10 more non-numeric features"


def test_limits_on_features_and_classes() -> None:
    with pytest.raises(DatasetInvalidError, match="3 feature columns, above the limit of 2"):
        parse_csv(
            csv_bytes("a,b,c,y", ["1,2,3,0"] * 20), label="y", limits=IngestLimits(max_features=2)
        )
    rows = [f"{i},{i % 4}" for i in range(40)]
    with pytest.raises(DatasetInvalidError, match="4 classes, above the limit of 3"):
        parse_csv(csv_bytes("a,y", rows), label="y", limits=IngestLimits(max_classes=3))


# ----------------------------------------------------------------------------- NPZ


def test_npz_with_names_and_string_classes() -> None:
    x = np.arange(60, dtype=np.float64).reshape(30, 2) / 4
    labels = np.array(["on", "off", "idle"] * 10)
    data = npz_bytes(
        x=x,
        state=labels,
        feature_names=np.array(["temp", "rpm"]),
        class_names=np.array(["off", "idle", "on"]),
    )
    parsed = parse_upload(data, label="state")
    assert parsed.source_format == "npz"
    assert parsed.schema.feature_names == ["temp", "rpm"]
    assert parsed.schema.class_names == ["off", "idle", "on"]  # the given order
    assert parsed.y[:3].tolist() == [2, 0, 1]
    assert parsed.schema.feature_dtypes == ["float64", "float64"]


def test_npz_images_keep_their_shape_and_get_index_names() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(20, 4, 3, 2), dtype=np.uint8)
    parsed = parse_npz(npz_bytes(x=x, y=np.arange(20).reshape(20, 1) % 2), label="y")
    assert parsed.schema.input_shape == [4, 3, 2]
    assert parsed.schema.feature_names[:3] == ["x[0,0,0]", "x[0,0,1]", "x[0,1,0]"]
    assert len(parsed.schema.feature_names) == 24
    assert parsed.schema.feature_dtypes == ["int64"] * 24
    assert np.array_equal(parsed.x, x.reshape(20, 24).astype(np.float32))


def test_npz_integer_labels_index_the_given_class_names() -> None:
    data = npz_bytes(x=np.ones((20, 2)), y=np.arange(20) % 2, class_names=np.array(["no", "yes"]))
    assert parse_npz(data, label="y").schema.class_names == ["no", "yes"]
    out_of_range = npz_bytes(
        x=np.ones((20, 2)), y=np.arange(20) % 3, class_names=np.array(["a", "b"])
    )
    with pytest.raises(DatasetInvalidError, match="must index class_names"):
        parse_npz(out_of_range, label="y")


@pytest.mark.parametrize(
    ("arrays", "label", "expected"),
    [
        ({"y": np.arange(20) % 2}, "y", "no array 'x'"),
        ({"x": np.ones((20, 2))}, "y", "no array 'y' for the label"),
        ({"x": np.ones(20), "y": np.arange(20) % 2}, "y", "it must be (rows, ...)"),
        ({"x": np.array([["a"] * 2] * 20), "y": np.arange(20) % 2}, "y", "'x' is not numeric"),
        ({"x": np.ones((20, 2)), "y": np.arange(19) % 2}, "y", "has 19 rows but 'x' has 20"),
        ({"x": np.ones((20, 2)), "y": np.ones((20, 2))}, "y", "expected (rows,)"),
        (
            {"x": np.ones((20, 2)), "y": np.arange(20) % 2, "feature_names": np.array(["a"])},
            "y",
            "1 feature names were given for 2 features",
        ),
        ({"x": np.ones((20, 2)), "y": np.arange(20) % 2}, "x", "reserved"),
    ],
)
def test_npz_problems(arrays: dict[str, np.ndarray], label: str, expected: str) -> None:
    with pytest.raises(DatasetInvalidError) as excinfo:
        parse_npz(npz_bytes(**arrays), label=label)
    assert any(expected in p for p in problems_of(excinfo)), problems_of(excinfo)


def test_npz_pickles_are_refused() -> None:
    data = npz_bytes(x=np.array([[{"a": 1}]] * 20, dtype=object), y=np.arange(20) % 2)
    with pytest.raises(DatasetInvalidError, match="holds Python objects"):
        parse_npz(data, label="y")


def test_npz_that_is_not_an_archive() -> None:
    single = io.BytesIO()
    np.save(single, np.ones(3))
    with pytest.raises(DatasetInvalidError, match=r"single \.npy array"):
        parse_npz(single.getvalue(), label="y")
    with pytest.raises(DatasetInvalidError, match="not a readable NPZ"):
        parse_npz(b"PK\x03\x04 broken", label="y")


def test_npz_expansion_is_bounded() -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((20_000, 64)), y=np.arange(20_000) % 2)
    assert len(buffer.getvalue()) < 100_000
    with pytest.raises(DatasetInvalidError, match="uncompressed, above the limit"):
        parse_npz(buffer.getvalue(), label="y", limits=IngestLimits(max_expanded_bytes=1_000_000))


def test_upload_format_is_told_by_the_first_bytes() -> None:
    data = npz_bytes(x=np.ones((20, 2)), y=np.arange(20) % 2)
    assert parse_upload(io.BytesIO(data), label="y").source_format == "npz"
    with pytest.raises(DatasetInvalidError, match="ZIP archive, not CSV"):
        parse_upload(data, label="y", source_format="csv")


# ----------------------------------------------------------------------------- the content hash


def test_content_hash_follows_values_not_notation_or_format() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 2)).astype(np.float32)
    y = np.arange(20) % 2
    plain = csv_bytes(
        "f0,f1,label", [f"{a!r},{b!r},{c}" for (a, b), c in zip(x.tolist(), y, strict=True)]
    )
    fancy = csv_bytes(
        '"f0" , "f1",label',
        [f' {a!r} ,"{b!r}", {c}.0 ' for (a, b), c in zip(x.tolist(), y, strict=True)],
        newline="\r\n",
    )
    npz = npz_bytes(x=x, label=y, feature_names=np.array(["f0", "f1"]))
    hashes = {
        parse_csv(plain, label="label").content_sha256,
        parse_csv(fancy, label="label").content_sha256,
        parse_npz(npz, label="label").content_sha256,
    }
    assert len(hashes) == 1
    changed = csv_bytes(
        "f0,f1,label",
        [f"{a!r},{b + 1!r},{c}" for (a, b), c in zip(x.tolist(), y, strict=True)],
    )
    assert parse_csv(changed, label="label").content_sha256 not in hashes
    assert (
        parse_csv(plain, label="label").source_sha256
        != parse_csv(fancy, label="label").source_sha256
    )


def test_parsed_datasets_are_canonical_and_read_only() -> None:
    rows = [f"{'-0.0' if i == 0 else i},{'nan' if i == 1 else i},{i % 2}" for i in range(40)]
    parsed = parse_csv(csv_bytes("a,b,y", rows), label="y", limits=IngestLimits(max_nan_share=0.5))
    assert np.signbit(parsed.x[0, 0]) == np.False_
    with pytest.raises(ValueError, match="read-only"):
        parsed.x[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        parsed.y[0] = 1
    with zipfile.ZipFile(io.BytesIO(parsed.canonical_npz())) as archive:
        assert archive.namelist() == ["schema_json.npy", "x.npy", "y.npy"]
    assert parsed.canonical_npz() == parsed.canonical_npz()


def test_from_arrays_validates_like_an_upload() -> None:
    parsed = from_arrays(
        np.ones((20, 64)),
        np.arange(20) % 2,
        label="digit",
        input_shape=[8, 8, 1],
        class_names=["zero", "one"],
    )
    assert isinstance(parsed, ParsedDataset)
    assert parsed.schema.input_shape == [8, 8, 1]
    assert parsed.source_format == "builtin" and parsed.source_sha256 == parsed.content_sha256
    with pytest.raises(DatasetInvalidError, match=r"input_shape \[8, 8, 2\] does not fit"):
        from_arrays(np.ones((20, 64)), np.arange(20) % 2, label="y", input_shape=[8, 8, 2])
