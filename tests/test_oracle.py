"""The oracle's training set: fresh real renders of every group, as many as a generative
method keeps, none of them an image of the dataset, in the synthetic shard layout."""

from __future__ import annotations

import pytest

from engine.config import load_config
from engine.errors import FairsynthError
from engine.runs import RunDir
from engine.stages.data.stage import load_run_dataset, run_data_stage
from engine.stages.generate.oracle import images_per_group, run_oracle_stage
from engine.stages.generate.shards import decode_png, read_synthetic

SMALL = ["data.builtin.n_train=240", "data.builtin.n_val=40", "data.builtin.n_test=40", "data.severity=0.9",
         "generate.images_per_group=12", "generate.rows_per_shard=10"]


def _run(tmp_path, extra=()):
    cfg = load_config(None, [*SMALL, f"run_dir={tmp_path}", *extra])
    run = RunDir(tmp_path)
    run.prepare(cfg)
    run_data_stage(cfg, run)
    return cfg, run


def test_oracle_set_is_balanced_fresh_and_real(tmp_path):
    from engine.models.judge import load_judge, read_groups

    cfg, run = _run(tmp_path)
    count = run_oracle_stage(cfg, run)
    per_group = images_per_group(cfg, load_run_dataset(run).group_counts("train"))
    assert per_group == 9  # 12 generated, 75% kept
    rows = read_synthetic(run, "oracle")
    assert count == len(rows) == 4 * per_group
    assert rows.groupby("group").size().tolist() == [per_group] * 4
    assert rows["kept"].all() and (rows["method"] == "oracle").all()
    # None is an image of the dataset, val and test included.
    dataset_seeds = {int(s.split("/")[4]) for s in load_run_dataset(run).records["source"]}
    assert not dataset_seeds & set(rows["seed"])
    # Real renders of their group: the learned judge reads them as such.
    labels, attributes = read_groups(load_judge(), [decode_png(b) for b in rows["image"]])
    right = (labels * 2 + attributes == rows["group"].to_numpy()).mean()
    assert right >= 0.9
    # A second run finds the marker and draws nothing.
    marker = (tmp_path / "oracle/_COMPLETE.json").read_text()
    assert run_oracle_stage(cfg, run) == count and (tmp_path / "oracle/_COMPLETE.json").read_text() == marker


def test_oracle_follows_the_seed(tmp_path):
    first = read_synthetic(_drawn(tmp_path / "a"), "oracle")
    again = read_synthetic(_drawn(tmp_path / "b"), "oracle")
    other = read_synthetic(_drawn(tmp_path / "c", ["seed=3"]), "oracle")
    assert first["seed"].tolist() == again["seed"].tolist()
    assert first["seed"].tolist() != other["seed"].tolist()


def _drawn(path, extra=()):
    cfg, run = _run(path, extra)
    run_oracle_stage(cfg, run)
    return run


def test_oracle_on_real_data_is_one_line():
    with pytest.raises(FairsynthError, match=r"'oracle' needs data.name=builtin"):
        load_config(None, ["data.name=waterbirds", "data.root=/nowhere", "methods=[erm,oracle]"])
