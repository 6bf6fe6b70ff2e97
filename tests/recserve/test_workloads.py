import json

import pytest

from recserve.workloads import BUNDLED, WorkloadError, load_workload


def _write(tmp_path, raw):
    path = tmp_path / "w.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture
def raw():
    return json.loads(json.dumps(load_workload("tiny").to_json()))


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_workloads_load_and_round_trip(name, tmp_path):
    w = load_workload(name)
    assert w.name == name and w.tables
    assert load_workload(_write(tmp_path, w.to_json())) == w  # "name" in the JSON wins over the file name


def test_a_path_loads_like_a_bundled_name(tmp_path, raw):
    w = load_workload(_write(tmp_path, raw))
    assert w.features == load_workload("tiny").features


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.update(colour="red"), "colour"),
        (lambda r: r["tables"][0].update(shards=2), "shards"),
        (lambda r: r.pop("top_mlp"), "top_mlp"),
        (lambda r: r["tables"][1].pop("rows"), "rows"),
        (lambda r: r["tables"][0].update(rows=0), "rows"),
        (lambda r: r["tables"][2].update(dim=-8), "dim"),
        (lambda r: r["tables"][0].update(pooling_factor=0), "pooling_factor"),
        (lambda r: r.update(dense_features=0), "dense_features"),
        (lambda r: r.update(bottom_mlp=[16, 4]), "bottom_mlp"),
        (lambda r: r.update(top_mlp=[16, 2]), "top_mlp"),
        (lambda r: r.update(interaction="attention"), "interaction"),
        (lambda r: r.update(samples_per_request=[5, 2]), "samples_per_request"),
        (lambda r: r["tables"][1].update(features=["user_id"]), "features"),
    ],
)
def test_invalid_workloads_are_rejected_naming_the_field(tmp_path, raw, mutate, field):
    mutate(raw)
    with pytest.raises(WorkloadError, match=field):
        load_workload(_write(tmp_path, raw))


def test_dcnv2_needs_its_layer_settings(tmp_path):
    raw = load_workload("dlrmv2").to_json()
    raw.pop("dcn_layers")
    with pytest.raises(WorkloadError, match="dcn_layers"):
        load_workload(_write(tmp_path, raw))


def test_unknown_name_that_is_no_file_is_an_error():
    with pytest.raises(WorkloadError, match="not a bundled name"):
        load_workload("no-such-workload")


def test_max_rows_caps_every_table():
    w = load_workload("criteo-kaggle").with_max_rows(1000)
    assert max(t.rows for t in w.tables) == 1000
    assert min(t.rows for t in w.tables) == 3  # small tables keep their size
