"""The data contract: what the loader accepts, rejects, and how it says so."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.data import DataError, load_catalog, load_events
from tests.conftest import write_csv


def test_catalog_optional_columns_may_be_blank(tiny_catalog):
    catalog, report = load_catalog(tiny_catalog)
    assert list(catalog.item_ids) == ["a", "b", "c"]
    items = catalog.items.set_index("item_id")
    assert items.loc["a", "genres"] == ["Comedy", "Drama"]
    assert np.isnan(items.loc["b", "year"])
    assert np.isnan(items.loc["c", "seasons"])
    assert report.rejected_total == 0


def test_missing_required_column_names_file_and_column(tmp_path, tiny_catalog):
    path = write_csv(tmp_path / "events.csv", "user_id,item_id\nu1,a\n")
    catalog, _ = load_catalog(tiny_catalog)
    with pytest.raises(DataError) as err:
        load_events(path, catalog)
    message = str(err.value)
    assert "events.csv" in message and "'timestamp'" in message


def test_unparsable_values_fail_with_file_column_and_lines(tmp_path, tiny_catalog):
    rows = ["user_id,item_id,timestamp,watch_seconds"] + [f"u{i},a,1700000000,100" for i in range(20)]
    rows[3] = "u2,a,yesterday,100"
    rows[7] = "u6,a,1700000000,-5"
    path = write_csv(tmp_path / "events.csv", "\n".join(rows) + "\n")
    catalog, _ = load_catalog(tiny_catalog)
    with pytest.raises(DataError) as err:
        load_events(path, catalog)
    message = str(err.value)
    assert "column 'timestamp'" in message and "lines 4" in message and "'yesterday'" in message
    assert "column 'watch_seconds'" in message and "lines 8" in message
    assert "nothing was published" in message


def test_a_small_share_of_bad_rows_is_rejected_and_counted(tmp_path, tiny_catalog):
    rows = ["user_id,item_id,timestamp"] + [f"u{i % 7},{'abc'[i % 3]},{1700000000 + i}" for i in range(300)]
    rows[10] = "u1,a,not-a-time"
    path = write_csv(tmp_path / "events.csv", "\n".join(rows) + "\n")
    catalog, _ = load_catalog(tiny_catalog)
    events, report = load_events(path, catalog)
    assert len(events) == 299
    assert report.rows_rejected == {"timestamp: not unix seconds or ISO-8601": 1}


def test_unknown_titles_are_counted_and_reported(tmp_path, tiny_catalog):
    path = write_csv(
        tmp_path / "events.csv",
        "user_id,item_id,timestamp\nu1,a,1700000000\nu1,zzz,1700000001\nu2,zzz,1700000002\nu2,b,2023-11-14T22:13:20Z\n",
    )
    catalog, _ = load_catalog(tiny_catalog)
    events, report = load_events(path, catalog)
    assert len(events) == 2
    assert report.unknown_items == 2 and report.unknown_item_examples == ["zzz"]
    assert sorted(events.timestamp.tolist()) == [1700000000, 1700000000]  # ISO-8601 parsed to the same second


def test_extra_columns_ignored_and_parquet_glob(tmp_path, tiny_catalog):
    catalog, _ = load_catalog(tiny_catalog)
    for day in (1, 2):
        pd.DataFrame(
            {"user_id": ["u1", "u2"], "item_id": ["a", "c"], "timestamp": [1700000000 + day] * 2, "device": ["tv", "phone"]}
        ).to_parquet(tmp_path / f"events-{day}.parquet")
    events, report = load_events(str(tmp_path / "events-*.parquet"), catalog)
    assert len(events) == 4 and len(report.files) == 2
    assert list(events.user_ids) == ["u1", "u2"]
    assert np.isnan(events.watch_seconds).all()


def test_wrong_delimiter_and_encoding_are_clear(tmp_path, tiny_catalog):
    catalog, _ = load_catalog(tiny_catalog)
    semicolons = write_csv(tmp_path / "events.csv", "user_id;item_id;timestamp\nu1;a;1700000000\n")
    with pytest.raises(DataError, match="not comma-separated"):
        load_events(semicolons, catalog)
    latin = tmp_path / "catalog.csv"
    latin.write_bytes("item_id,title\nx,Caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="catalog.csv"):
        load_catalog(latin)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.csv: no such file"):
        load_catalog(tmp_path / "nope.csv")


def test_parquet_and_csv_of_the_same_rows_load_alike(tmp_path, tiny_catalog):
    """Parquet ids are read dictionary-encoded (one dictionary per row group) and each distinct id is
    checked once: the same rows as CSV give the same events, rejections and examples."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    catalog, _ = load_catalog(tiny_catalog)
    rows = {
        "user_id": ["u1", " u1", "u2", None, "", "u\x01x", "u3", "u2", "u4", "u1"],
        "item_id": ["a", "b ", "c", "a", "a", "b", "zzz", None, "yyy", "c"],
        "timestamp": [1700000000 + n for n in range(10)],
    }
    csv = tmp_path / "events.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    parquet = tmp_path / "events.parquet"
    pq.write_table(pa.table(rows), parquet, row_group_size=3)  # four row groups, four dictionaries
    assert pq.ParquetFile(parquet).metadata.num_row_groups == 4
    loaded = {path.suffix: load_events(path, catalog, max_rejected_share=0.9) for path in (csv, parquet)}
    (from_csv, csv_report), (from_parquet, parquet_report) = loaded[".csv"], loaded[".parquet"]
    assert list(from_parquet.user_ids) == list(from_csv.user_ids) == ["u1", "u2"]  # " u1" is u1
    for column in ("user", "item", "timestamp"):
        assert getattr(from_parquet, column).tolist() == getattr(from_csv, column).tolist()
    assert from_parquet.user.tolist() == [0, 0, 0, 1] and from_parquet.item.tolist() == [0, 1, 2, 2]
    assert parquet_report.rows_rejected == csv_report.rows_rejected == {
        "user_id: blank, too long or with control characters": 3,
        "item_id: blank, too long or with control characters": 1,
    }
    assert parquet_report.unknown_items == csv_report.unknown_items == 2
    assert parquet_report.unknown_item_examples == csv_report.unknown_item_examples == ["zzz", "yyy"]


def test_parquet_with_numeric_ids_reads_them_as_strings(tmp_path):
    """Only string id columns are read dictionary-encoded; numeric ones are cast to text, as before."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    catalog_path = write_csv(tmp_path / "catalog.csv", "item_id,title\n10,Ten\n20,Twenty\n")
    catalog, _ = load_catalog(catalog_path)
    path = tmp_path / "events.parquet"
    pq.write_table(pa.table({"user_id": [7, 7, 8], "item_id": ["20", "10", "30"], "timestamp": [3, 1, 2]}), path)
    events, report = load_events(path, catalog)
    assert list(events.user_ids) == ["7"] and events.user.tolist() == [0, 0]  # 8 watched only an unknown title
    assert [catalog.item_ids[i] for i in events.item] == ["10", "20"]  # u7's titles in time order
    assert report.unknown_items == 1 and report.unknown_item_examples == ["30"]


def test_stable_argsort_is_numpys_stable_argsort():
    """torch's stable sort behind the loader's time order and the published histories gives numpy's permutation."""
    from models.data import stable_argsort

    rng = np.random.default_rng(3)
    for key in (rng.integers(0, 50, 10_000), rng.integers(-(2**40), 2**40, 5_000), np.zeros(7, np.int64), np.arange(0)):
        key = key.astype(np.int64)
        np.testing.assert_array_equal(stable_argsort(key), np.argsort(key, kind="stable"))


def test_integer_parquet_times_and_watch_seconds_follow_the_csv_rules(tmp_path, tiny_catalog):
    """Integer Parquet columns take a path without a float round trip: nulls, negatives, a millisecond
    timestamp and a too-long viewing are rejected or unknown exactly as the same rows in CSV are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    catalog, _ = load_catalog(tiny_catalog)
    rows = {
        "user_id": ["u1", "u1", "u2", "u2", "u3", "u3", "u4", "u4"],
        "item_id": ["a", "b", "c", "a", "b", "c", "a", "b"],
        "timestamp": [1700000000, None, 1700000002, -5, 1700000004, 1700000005000, 1700000006, 1700000007],
        "watch_seconds": [60, 120, None, 30, -1, 10, 86401, 86400],
    }
    parquet = tmp_path / "events.parquet"
    table = pa.table({**rows, "timestamp": pa.array(rows["timestamp"], pa.int64()),
                      "watch_seconds": pa.array(rows["watch_seconds"], pa.int64())})  # fmt: skip
    pq.write_table(table, parquet, row_group_size=3)
    csv = tmp_path / "events.csv"
    pd.DataFrame(rows).astype({"timestamp": "Int64", "watch_seconds": "Int64"}).to_csv(csv, index=False)
    (from_csv, csv_report), (from_parquet, parquet_report) = (
        load_events(path, catalog, max_rejected_share=0.9) for path in (csv, parquet)
    )
    assert parquet_report.rows_rejected == csv_report.rows_rejected == {
        "timestamp: not unix seconds or ISO-8601": 3,
        "watch_seconds: not a number from 0 to 86400": 2,
    }
    for column in ("user", "item", "timestamp"):
        assert getattr(from_parquet, column).tolist() == getattr(from_csv, column).tolist()
    np.testing.assert_array_equal(from_parquet.watch_seconds, from_csv.watch_seconds)  # NaN where unknown
    assert from_parquet.timestamp.tolist() == [1700000000, 1700000002, 1700000007]
    assert np.isnan(from_parquet.watch_seconds[1]) and from_parquet.watch_seconds[2] == 86400


def test_event_files_read_ahead_give_the_same_events_and_name_a_broken_file(tmp_path, tiny_catalog):
    """EventFiles reads each file while the one before it is validated (and the first while the job loads
    the catalogue): the same events as reading them in turn, and a broken later file is named."""
    from models.data import EventFiles

    catalog, _ = load_catalog(tiny_catalog)
    for day in (1, 2, 3):
        pd.DataFrame(
            {"user_id": ["u1", "u2", f"u{day + 2}"], "item_id": ["a", "c", "b"], "timestamp": [1700000000 + day] * 3}
        ).to_parquet(tmp_path / f"events-{day}.parquet")
    spec = str(tmp_path / "events-*.parquet")
    ahead, ahead_report = load_events(EventFiles(spec), catalog)
    plain, plain_report = load_events(spec, catalog)
    assert list(ahead.user_ids) == list(plain.user_ids) == ["u1", "u2", "u3", "u4", "u5"]
    for column in ("user", "item", "timestamp"):
        assert getattr(ahead, column).tolist() == getattr(plain, column).tolist()
    assert ahead_report.files == plain_report.files and len(ahead_report.files) == 3
    (tmp_path / "events-2.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match="events-2.parquet"):
        load_events(EventFiles(spec), catalog)
    (tmp_path / "events-2.parquet").unlink()
    pd.DataFrame({"user_id": ["u1"], "item_id": ["a"]}).to_parquet(tmp_path / "events-2.parquet")
    with pytest.raises(DataError, match="events-2.parquet.*'timestamp'"):
        load_events(EventFiles(spec), catalog)
    files = EventFiles(spec)  # a job that fails before it loads the events stops the reading
    files.close()
    with pytest.raises(DataError, match="no file matches"):
        EventFiles(str(tmp_path / "nothing-*.parquet"))
