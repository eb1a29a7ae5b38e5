"""The curated subset record: one format for pretraining and the converter, older converter files still read."""

from __future__ import annotations

import json

import pytest

from chexficient.data.subsets import SUBSET_FILENAME, curated_subset_record, read_curated_subset, write_curated_subset


def test_record_round_trip_with_ids_and_counts(tmp_path):
    record = curated_subset_record([4, 1], ids=["p4", "p1"], num_candidates=8, source="train.csv")
    path = write_curated_subset(tmp_path, record)
    assert path == tmp_path / SUBSET_FILENAME
    read = read_curated_subset(tmp_path)
    assert read == record
    assert read["num_curated"] == 2 and read["ratio"] == 0.25 and read["ids"] == ["p4", "p1"]


def test_indices_stand_in_for_unknown_ids_and_lengths_must_agree():
    record = curated_subset_record([3, 5])
    assert record["ids"] == [3, 5] and record["num_candidates"] is None and record["ratio"] is None
    with pytest.raises(ValueError, match="2 ids for 1 indices"):
        curated_subset_record([1], ids=["a", "b"])


def test_the_converters_first_format_is_read_as_the_current_one(tmp_path):
    (tmp_path / SUBSET_FILENAME).write_text(json.dumps({"num_ids": 2, "source": "ckpt.pth", "ids": [7, 9]}))
    read = read_curated_subset(tmp_path / SUBSET_FILENAME)
    assert read["num_curated"] == 2 and read["indices"] == [7, 9] and read["source"] == "ckpt.pth"


def test_unreadable_files_name_the_path(tmp_path):
    bad = tmp_path / SUBSET_FILENAME
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=SUBSET_FILENAME):
        read_curated_subset(bad)
    bad.write_text(json.dumps({"num_curated": 1}))
    with pytest.raises(ValueError, match="no 'ids' field"):
        read_curated_subset(bad)
