"""Loaders read each dataset's format as distributed; severity, groups and metrics match
hand-computed values; bad input is one line and exit code 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.config import PRESET_DIR, load_config
from engine.errors import FairsynthError
from engine.metrics import group_accuracies, summarize
from engine.stages.data import builtin
from engine.stages.data.datasets import find_bad_images, load_image
from engine.stages.data.prepare import load_dataset
from engine.stages.data.severity import apply_severity, conflicting_to_keep, infer_aligned

ROOT = Path(__file__).resolve().parents[1]


def _img(path: Path, colour=(10, 20, 30), size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def data_cfg(name, root, **extra):
    sets = [f"data.name={name}", f"data.root={root}"] + [f"data.{k}={v}" for k, v in extra.items()]
    return load_config(None, sets).data


# --- fixtures in each on-disk format -------------------------------------------------------


@pytest.fixture
def waterbirds_root(tmp_path: Path) -> Path:
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    # train: class 0 -> 6 on land (place 0), 2 on water; class 1 -> 1 on land, 5 on water.
    spec = [(0, 0, 6), (0, 1, 2), (1, 0, 1), (1, 1, 5)]
    i = 0
    for y, place, count in spec:
        for _ in range(count):
            i += 1
            name = f"{y:03d}.Bird/img_{i}.jpg"
            rows.append(f"{i},{name},{y},0,{place},/x/{i}.jpg")
            _img(tmp_path / name)
    for split in (1, 2):
        for y in (0, 1):
            for place in (0, 1):
                i += 1
                name = f"{y:03d}.Bird/img_{i}.jpg"
                rows.append(f"{i},{name},{y},{split},{place},/x/{i}.jpg")
                _img(tmp_path / name)
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


@pytest.fixture
def celeba_root(tmp_path: Path) -> Path:
    names = ["5_o_Clock_Shadow", "Blond_Hair", "Male", "Smiling"]
    # (blond, male, partition) per image
    spec = [(1, 0, 0), (1, 0, 0), (1, 1, 0), (-1, 1, 0), (-1, 1, 0), (-1, -1, 0), (1, -1, 1), (-1, 1, 2)]
    lines = [str(len(spec)), " ".join(names)]
    parts = []
    for i, (blond, male, part) in enumerate(spec):
        fname = f"{i + 1:06d}.jpg"
        # Columns separated by one or more spaces, as in the real file.
        lines.append(f"{fname}  -1 {blond:2d}  {male:2d} 1")
        parts.append(f"{fname} {part}")
        _img(tmp_path / "img_align_celeba" / fname)
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return tmp_path


@pytest.fixture
def utkface_root(tmp_path: Path) -> Path:
    root = tmp_path / "UTKFace"
    good = [(25, 0), (30, 1), (45, 0), (61, 1), (8, 0), (39, 1), (70, 0), (22, 1), (55, 1), (33, 0)]
    for i, (age, gender) in enumerate(good):
        _img(root / f"{age}_{gender}_0_2017011{i}.jpg.chip.jpg")
    _img(root / "39_1_20170116174525125.jpg.chip.jpg")  # malformed: no race field
    _img(root / "notes_2.jpg")  # malformed
    return root


# --- loaders -------------------------------------------------------------------------------


def test_waterbirds_groups_and_counts(waterbirds_root):
    ds = load_dataset(data_cfg("waterbirds", waterbirds_root))
    assert ds.n_groups == 4
    assert ds.group_counts("train") == [6, 2, 1, 5]
    assert ds.group_counts("val") == [1, 1, 1, 1]
    assert ds.info["aligned"] == {0: 0, 1: 1}
    row = ds.split("train").iloc[0]
    assert row["group"] == row["label"] * 2 + row["attribute"]
    assert load_image(row["source"], 16).shape == (16, 16, 3)


def test_waterbirds_severity_keeps_ffr_count(waterbirds_root):
    # p = 0.8: class 0 keeps round(6 * 0.25) = 2 (has 2); class 1 keeps round(5 * 0.25) = 1.
    ds = load_dataset(data_cfg("waterbirds", waterbirds_root, severity=0.8))
    assert ds.group_counts("train") == [6, 2, 1, 5]
    # p = 0.9: class 0 keeps round(6 / 9) = 1; class 1 keeps round(5 / 9) = 1.
    ds = load_dataset(data_cfg("waterbirds", waterbirds_root, severity=0.9))
    assert ds.group_counts("train") == [6, 1, 1, 5]
    assert ds.group_counts("test") == [1, 1, 1, 1]  # untouched


def test_waterbirds_missing_column_is_clear(waterbirds_root):
    meta = waterbirds_root / "metadata.csv"
    meta.write_text(meta.read_text().replace("place,", "location,", 1))
    with pytest.raises(FairsynthError, match="no column 'place'"):
        load_dataset(data_cfg("waterbirds", waterbirds_root))


def test_celeba_blond_vs_male(celeba_root):
    ds = load_dataset(data_cfg("celeba", celeba_root))
    # groups: (non-blond, female)=0, (non-blond, male)=1, (blond, female)=2, (blond, male)=3
    assert ds.group_counts("train") == [1, 2, 2, 1]
    assert ds.group_counts("val") == [0, 0, 1, 0]
    assert ds.group_counts("test") == [0, 1, 0, 0]
    assert ds.class_names == ["non-blond hair", "blond hair"]


def test_celeba_unknown_attribute(celeba_root):
    with pytest.raises(FairsynthError, match="unknown attribute name 'Bald'"):
        load_dataset(data_cfg("celeba", celeba_root, attribute="Bald"))


def test_utkface_names_bins_and_split(utkface_root):
    ds = load_dataset(data_cfg("utkface", utkface_root))
    assert len(ds.records) == 10  # two malformed names skipped
    counts = {s: int((ds.records["split"] == s).sum()) for s in ("train", "val", "test")}
    assert counts == {"train": 8, "val": 1, "test": 1}
    by_id = ds.records.set_index("image_id")
    row = by_id.loc["45_0_0_20170112.jpg.chip.jpg"]
    assert (row["label"], row["attribute"]) == (0, 1)  # male, age bin [40, 200)
    again = load_dataset(data_cfg("utkface", utkface_root))
    assert again.records["split"].tolist() == ds.records["split"].tolist()  # seeded


def test_manifest_loader(tmp_path):
    for i in range(4):
        _img(tmp_path / f"im{i}.png")
    (tmp_path / "manifest.csv").write_text(
        "path,label,attribute,split\nim0.png,0,0,train\nim1.png,1,1,train\nim2.png,1,0,val\nim3.png,0,1,2\n"
    )
    ds = load_dataset(data_cfg("manifest", tmp_path))
    assert ds.group_counts("train") == [1, 0, 0, 1]
    assert ds.group_counts("test") == [0, 1, 0, 0]


def test_corrupt_image_fails_or_is_skipped(waterbirds_root):
    victim = next(waterbirds_root.glob("000.Bird/*.jpg"))
    victim.write_bytes(victim.read_bytes()[:40])  # truncated
    with pytest.raises(FairsynthError, match=r"1 unreadable images: .*img_"):
        load_dataset(data_cfg("waterbirds", waterbirds_root), check_images=True)
    ds = load_dataset(data_cfg("waterbirds", waterbirds_root, skip_bad_images="true"), check_images=True)
    assert ds.info["bad_images_skipped"] == 1
    assert sum(ds.group_counts("train")) + sum(ds.group_counts("val")) + sum(ds.group_counts("test")) == 21


def _png_claiming_size(path: Path, width: int, height: int) -> None:
    """A small PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    import struct
    import zlib

    _img(path, size=(4, 4))
    data = bytearray(path.read_bytes())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    path.write_bytes(bytes(data))


def test_16_bit_grey_converts_and_float_pixels_are_refused(tmp_path):
    ramp = np.array([[0, 257 * 64, 257 * 128, 65535]] * 4, dtype=np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")  # Pillow reads it back as mode I;16
    pixels = load_image(str(tmp_path / "grey16.png"), 4)
    assert pixels[0, :, 0].tolist() == [0, 64, 128, 255] and (pixels[..., 0] == pixels[..., 2]).all()
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(FairsynthError, match=r"float.tiff has floating-point pixels \(mode F\)"):
        load_image(str(tmp_path / "float.tiff"), 4)
    assert find_bad_images([str(tmp_path / "grey16.png"), str(tmp_path / "float.tiff")]) == [str(tmp_path / "float.tiff")]


@pytest.mark.parametrize("side", [10_000, 30_000])  # past Pillow's warning, and past its own refusal
def test_a_decompression_bomb_is_refused_in_one_line(tmp_path, side):
    bomb = tmp_path / "bomb.png"
    _png_claiming_size(bomb, side, side)
    with pytest.raises(FairsynthError, match=r"bomb.png .*decompression bomb.*; shrink or remove it$") as err:
        load_image(str(bomb), 32)
    assert len(str(err.value).splitlines()) == 1
    assert find_bad_images([str(bomb)]) == [str(bomb)]


# --- severity and groups -------------------------------------------------------------------


def test_infer_aligned_uses_over_representation():
    import pandas as pd

    # Attribute 1 is rare overall, but over-represented in class 1 relative to its frequency.
    train = pd.DataFrame({"label": [0] * 10 + [1] * 10, "attribute": [0] * 10 + [0] * 6 + [1] * 4})
    assert infer_aligned(train, 2, 2) == {0: 0, 1: 1}


def test_conflicting_count_rule():
    assert conflicting_to_keep(950, 0.999) == 1
    assert conflicting_to_keep(950, 0.95) == 50
    assert conflicting_to_keep(3498, 0.999) == 4


def test_severity_is_seeded_and_leaves_eval_splits():
    cfg = load_config(None, ["data.severity=0.99"]).data
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.records["image_id"].tolist() == b.records["image_id"].tolist()
    assert a.group_counts("train") == [950, 10, 10, 950]
    assert a.group_counts("val") == [100, 100, 100, 100]
    original = load_dataset(load_config().data)
    assert original.group_counts("test") == a.group_counts("test")


def test_extreme_severity_can_empty_a_group():
    import pandas as pd

    records = pd.DataFrame(
        {"label": [0, 0, 0, 1, 1], "attribute": [0, 0, 1, 1, 1], "split": ["train"] * 5}
    )
    out = apply_severity(records, 0.999, {0: 0, 1: 1}, seed=0)
    assert len(out) == 4  # round(2 * 0.001 / 0.999) = 0 conflicting kept


# --- built-in benchmark --------------------------------------------------------------------


def test_builtin_is_deterministic_and_has_subtypes():
    img = builtin.render("duck", "forest", 7)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(img, builtin.render("duck", "forest", 7))
    assert not np.array_equal(img, builtin.render("gull", "forest", 7))
    assert not np.array_equal(img, builtin.render("duck", "forest", 7, style="base"))
    ds = load_dataset(load_config().data)
    subtypes = ds.split("train").groupby("label")["subtype"].nunique()
    assert subtypes.tolist() == [3, 3]


def test_base_corpus_captions_match_images():
    corpus = builtin.base_corpus(12, seed=3)
    assert corpus.images.shape == (12, 32, 32, 3)
    for cap, o, b in zip(corpus.captions, corpus.object_index, corpus.background_index):
        object_words, background_words = builtin.true_words(builtin.OBJECTS[o], builtin.BACKGROUNDS[b])
        true_captions = {f"a {kind} of a {w}" + (f" on {where}" if where else "")
                         for kind in ("photo", "drawing") for w in object_words for where in background_words}
        assert cap in true_captions


def test_base_corpus_draws_photos_and_flat_drawings():
    corpus = builtin.base_corpus(40, seed=1)
    photos = [c.startswith("a photo of") for c in corpus.captions]
    assert 0 < sum(photos) < len(photos)
    for image, photo in zip(corpus.images, photos):
        distinct = len(np.unique(image.reshape(-1, 3), axis=0))
        # A drawing is a few flat colours; a photo is shaded, textured and lit.
        assert distinct > 20 if photo else distinct <= 6


def test_photos_wear_any_colour_so_colour_does_not_name_the_bird():
    """The base corpus's photos colour a bird by chance, not by its kind; the benchmark's shared
    palette is for fine-tuning to find."""
    centres = []
    for seed in range(40):
        image = builtin.render("gull", "lake", seed, "photo").astype(int)
        centres.append(tuple(image[12:20, 12:20].reshape(-1, 3).mean(axis=0) // 40))
    assert len(set(centres)) >= 4


def test_base_corpus_speaks_the_prompts_words():
    """The prompts' class and attribute words appear in the corpus, in every pairing, so the
    tiny generator can learn "a waterbird on land" without a benchmark image of one."""
    corpus = builtin.base_corpus(600, seed=0)
    for label in builtin.CLASS_NAMES:
        for attribute in builtin.ATTRIBUTE_NAMES:
            assert builtin.caption(label, attribute) in corpus.captions
    assert builtin.caption("sparrow", "forest") in corpus.captions
    assert any(c == "a photo of a bird" or c.startswith("a photo of a bird on") for c in corpus.captions)
    # Images do not depend on how they are captioned.
    again = builtin.base_corpus(600, seed=0)
    np.testing.assert_array_equal(corpus.images, again.images)
    assert corpus.captions == again.captions


# --- metrics -------------------------------------------------------------------------------


def test_metrics_hand_computed():
    preds = [0, 0, 1, 1, 1, 0, 1, 0]
    labels = [0, 0, 0, 1, 1, 1, 1, 0]
    groups = [0, 0, 1, 2, 2, 3, 3, 0]
    assert group_accuracies(preds, labels, groups, 5)[:4] == [1.0, 0.0, 1.0, 0.5]
    assert math.isnan(group_accuracies(preds, labels, groups, 5)[4])
    result = summarize(preds, labels, groups, 4, train_group_counts=[10, 0, 5, 5])
    assert result["worst_group"] == 0.0
    assert result["average_group"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert result["weighted_average"] == pytest.approx((10 * 1 + 5 * 1 + 5 * 0.5) / 20)
    assert result["accuracy"] == pytest.approx(6 / 8)


def test_chance_is_the_exact_expected_worst_group_of_guessing():
    from engine.metrics import chance

    # Two groups of one image: the worst is right only when both guesses are (1/4).
    two = chance([1, 1], 2)
    assert two["worst_group"] == pytest.approx(0.25) and two["worst_group_std"] == pytest.approx(math.sqrt(0.25 - 0.0625))
    assert two["average_group"] == 0.5
    # One group of two: 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4.
    assert chance([2], 2)["worst_group"] == pytest.approx(0.5)
    # Three classes guess right a third of the time; an empty group does not count.
    assert chance([3, 0], 3)["average_group"] == pytest.approx(1 / 3)
    # Against simulation, at the built-in test split's sizes.
    rng = np.random.default_rng(0)
    simulated = rng.binomial(200, 0.5, size=(100_000, 4)).min(axis=1) / 200
    exact = chance([200] * 4, 2)
    assert exact["worst_group"] == pytest.approx(simulated.mean(), abs=5e-4)
    assert exact["worst_group_std"] == pytest.approx(simulated.std(), abs=5e-4)


# --- config and the data_stats job ---------------------------------------------------------


def test_config_errors_name_key_and_value():
    with pytest.raises(FairsynthError, match=r"data.severity = 1.2: must be 'original'"):
        load_config(None, ["data.severity=1.2"])
    with pytest.raises(FairsynthError, match=r"unknown key 'generate.imgs'; valid keys here: .*images_per_group"):
        load_config(None, ["generate.imgs=3"])
    with pytest.raises(FairsynthError, match="unknown method 'foo'"):
        load_config(None, ["methods=[erm, foo]"])
    with pytest.raises(FairsynthError, match="preset 'nope' not found"):
        load_config("nope")


def test_every_preset_loads():
    presets = sorted(PRESET_DIR.glob("*.yaml"))
    assert presets, "engine/configs/ has no presets"
    for path in presets:
        load_config(path)


def _job(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs/data_stats.py"), *args], capture_output=True, text=True, timeout=120
    )


def test_data_stats_job_prints_json(waterbirds_root):
    out = _job("--dataset", "waterbirds", "--root", str(waterbirds_root), "--severity", "0.9", "--json")
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["splits"]["train"]["group_counts"] == [6, 1, 1, 5]
    assert stats["aligned"] == {"0": 0, "1": 1}
    assert [g["id"] for g in stats["groups"]] == [0, 1, 2, 3]
    default = json.loads(_job("--json").stdout)
    assert default["dataset"] == "builtin" and default["splits"]["val"]["group_counts"] == [100] * 4


def _own_data(folder, rows: str):
    """A folder of images plus manifest.csv, as the README's walk-through has a user make."""
    folder.mkdir(exist_ok=True)
    for name in {line.split(",")[0] for line in rows.strip().splitlines()}:
        _img(folder / name)
    (folder / "manifest.csv").write_text("path,label,attribute,split\n" + rows)


def test_data_stats_on_your_own_folder_reports_missing_groups_before_any_work(tmp_path):
    _own_data(tmp_path / "mine", "a.png,0,0,train\nb.png,1,1,train\nc.png,0,1,val\nd.png,1,0,val\n"
              "e.png,0,0,test\nf.png,1,1,test\n")
    out = _job("--data.name", "manifest", "--data.root", str(tmp_path / "mine"),
               "--set", "data.class_names=[cat,dog]", "--data.attribute_names=[indoor,outdoor]")
    assert out.returncode == 0, out.stderr
    table = out.stdout.splitlines()
    assert table[0].startswith("manifest at severity original") and table[3].split()[-3:] == ["1", "0", "1"]
    notes = [line for line in table if line.startswith("note: ")]
    assert "group 1 (cat / outdoor), a bias-conflicting group, has no training images" in notes[0]
    assert any("group 2 (dog / indoor) has no test images" in n and "cannot be measured" in n for n in notes)


@pytest.mark.parametrize("rows, needle", [
    ("a.png,0,0,train\nb.png,1,1,validation\n", "has split 'validation'; expected train/val/test or 0/1/2"),
    ("a.png,0,0,train\nb.png,1,1,val\nghost.png,1,0,test\n", "1 of 3 image files do not exist: "),
])
def test_data_stats_names_a_wrong_split_or_path_in_one_line(tmp_path, rows, needle):
    _own_data(tmp_path / "mine", rows.replace("ghost.png,1,0,test\n", ""))
    (tmp_path / "mine" / "manifest.csv").write_text("path,label,attribute,split\n" + rows)
    out = _job("--data.name", "manifest", "--data.root", str(tmp_path / "mine"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and needle in out.stderr, out.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--dataset", "waterbirds", "--root", "/does/not/exist"], "does not exist"),
        (["--severity", "0.3"], "0.5 < p < 1"),
        (["--dataset", "celeba", "--root", "."], "missing attribute file"),
    ],
)
def test_data_stats_bad_input_is_one_line(args, needle):
    out = _job(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
