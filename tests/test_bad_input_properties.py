"""Property checks on what users type and what datasets ship: any ``--set KEY=VALUE`` and any
metadata file (Waterbirds metadata.csv, CelebA attribute and partition files, UTKFace file
names, a manifest CSV) either loads or fails with one FairsynthError line, never another
exception. The jobs turn that line into one stderr line and exit code 2."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from engine.config import Config, load_config
from engine.errors import FairsynthError
from engine.stages.data.prepare import load_dataset

ROOT = Path(__file__).resolve().parents[1]
# Modest, so the file runs in about half a minute on two cores: a dataset example writes files
# and loads them (~0.1 s), a config example only validates (~10 ms).
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONFIG_PROPERTY = settings(PROPERTY, max_examples=200)


def loads_or_fails_in_one_line(load):
    """Run ``load()``; a FairsynthError must be one non-empty line. Anything else propagates."""
    try:
        return load()
    except FairsynthError as err:
        lines = str(err).splitlines()
        assert len(lines) == 1 and lines[0].strip(), f"not one line: {str(err)!r}"
        return None


def mostly(good, odd, rolls: int = 20):
    """``good``, and now and then ``odd`` (hypothesis tries small integers often, so the odd
    case sits at the top of the range)."""
    return st.integers(0, rolls - 1).flatmap(lambda roll: odd if roll == rolls - 1 else good)


def dataset_files(text_strategy):
    """File contents: the strategy's text, one time in ten raw bytes (not UTF-8, or empty)."""
    return mostly(text_strategy, st.binary(max_size=40), rolls=10)


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


# --- config overrides and preset files ---------------------------------------------------------


def _config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys.extend(_config_keys(field.annotation, f"{prefix}{name}."))
    return keys


CONFIG_KEYS = _config_keys()
# YAML that parses to odd things: dates, tags whose constructors fail, anchors, big numbers.
ODD_YAML = [
    "", "~", "[", "{a: 1}", "{1: 2}", "[1, [2]]", "&a [*a]", "!!int x", "!!float x", "!!binary @@",
    "!!timestamp x", "2001-02-30", "2001-01-01", "1e400", "-.inf", ".nan", "0x1F", "1_000", "yes",
    "1" + "0" * 400, "-" + "9" * 30, "auto", "original", "0.999", "random:sd15:width=0.125",
    "random:sd15:width=x", "random:", "!!python/name:os.system", "'unterminated", "a: b: c",
]
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=3),
    max_leaves=6,
).map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip())
override_values = st.sampled_from(ODD_YAML) | st.text(max_size=20) | yaml_values
override_keys = (
    st.sampled_from(CONFIG_KEYS)
    | st.builds(lambda k, extra: f"{k}.{extra}", st.sampled_from(CONFIG_KEYS), st.text(max_size=6))
    | st.text(max_size=12)
)
overrides = st.builds(lambda k, v: f"{k}={v}", override_keys, override_values) | st.text(max_size=30)


@CONFIG_PROPERTY
@given(st.lists(overrides, min_size=1, max_size=3))
@example(["seed=2001-02-30"])  # yaml's date constructor raised ValueError
@example(["run_dir=!!timestamp x"])  # ... and AttributeError
@example(["data.severity=1" + "0" * 400])  # float() of a huge int: OverflowError
@example(["a\nb=1"])  # a key with a line break made a two-line message
@example(["finetune.trial_resources.a\rb=x"])
@example(["=1"])  # an empty key named no key
def test_any_override_loads_or_fails_in_one_line(texts):
    loads_or_fails_in_one_line(lambda: load_config(None, texts))


preset_trees = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(CONFIG_KEYS[:14]) | st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
preset_texts = st.one_of(
    preset_trees.map(lambda tree: yaml.safe_dump(tree)),
    st.builds(lambda key, value: f"{key}: {value}\n", st.sampled_from(CONFIG_KEYS), override_values),
    st.builds(lambda parent, rest: f"extends: {parent}\n{rest}", st.sampled_from(["paper", "waterbirds", "nope", "[a]", ""]),
              st.sampled_from(["", "seed: 3\n", "data: 1\n"])),
)


@PROPERTY
@given(dataset_files(preset_texts))
@example("seed: 2001-02-30\n")  # yaml's date constructor raised ValueError
@example(b"\xff\xfe")  # not UTF-8: UnicodeDecodeError
def test_any_preset_file_loads_or_fails_in_one_line(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "preset.yaml"
        _write(path, content)
        loads_or_fails_in_one_line(lambda: load_config(path))


def test_override_errors_name_the_key_and_read_as_typed():
    with pytest.raises(FairsynthError, match=r"^config error: --set '=1': the key path '' has an empty part"):
        load_config(None, ["=1"])
    with pytest.raises(FairsynthError, match=r"^config error: --set 'data..root=x'"):
        load_config(None, ["data..root=x"])
    with pytest.raises(FairsynthError, match=r"^config error: unknown key 'a\\nb'"):
        load_config(None, ["a\nb=1"])
    with pytest.raises(FairsynthError, match=r"^config error: seed = '2001-02-30': Input should be a valid integer"):
        load_config(None, ["seed=2001-02-30"])  # a malformed date is the text typed
    assert load_config(None, ["run_dir=!!timestamp x"]).run_dir == "!!timestamp x"
    with pytest.raises(FairsynthError, match=r"^config error: data.severity = 1000.*must be 'original' or a number p"):
        load_config(None, ["data.severity=1" + "0" * 400])


def test_a_bad_set_through_the_job_is_one_stderr_line_and_exit_code_2(tmp_path):
    for bad, needle in (("train.epochs=zero", "train.epochs = 'zero'"), ("seed=2001-02-30", "seed = '2001-02-30'"),
                        ("data.nope=1", "unknown key 'data.nope'")):
        out = subprocess.run(
            [sys.executable, str(ROOT / "jobs/full.py"), "--run-dir", str(tmp_path), "--set", bad],
            capture_output=True, text=True, timeout=120,
        )
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and needle in lines[0], out.stderr
        assert not list(tmp_path.iterdir())  # nothing ran


# --- dataset metadata -------------------------------------------------------------------------

# Cells a CSV column may hold when it is wrong: the wrong kind, out of range, or nothing.
odd_cells = st.one_of(
    st.sampled_from(["", "nan", "1.5", "0.0", "x", "-1", "3", "1" + "0" * 30, '"a,b"', "é", " 1"]),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n,\""), max_size=6),
)
# ... and when it is right, per column, so that many generated files load.
GOOD_CELLS = {
    "img_id": st.integers(0, 99).map(str), "img_filename": st.sampled_from(["a.jpg", "001.Bird/b.jpg"]),
    "path": st.sampled_from(["a.jpg", "sub/b.png"]), "y": st.sampled_from(["0", "1"]),
    "place": st.sampled_from(["0", "1"]), "label": st.sampled_from(["0", "1"]),
    "attribute": st.sampled_from(["0", "1"]), "split": st.sampled_from(["0", "1", "2"]),
}
MANIFEST_SPLITS = st.sampled_from(["0", "1", "2", "train", "val", "test"])


def cell(column: str, good: dict):
    return mostly(good.get(column, odd_cells), odd_cells, rolls=40)


@st.composite
def csv_files(draw, needed: tuple[str, ...], **good):
    """A CSV with the needed columns (now and then one missing or an extra) and mostly right cells."""
    columns = [c for c in needed if draw(st.integers(0, 29)) > 0]
    columns += draw(st.lists(st.sampled_from(["extra", "place_filename", needed[0]]), max_size=1))
    columns = draw(st.permutations(columns))
    cells = {**GOOD_CELLS, **good}
    rows = draw(st.lists(st.tuples(*[cell(c, cells) for c in columns]), min_size=draw(mostly(st.just(1), st.just(0))),
                         max_size=8))
    return "\n".join([",".join(columns), *(",".join(r) for r in rows)]) + "\n"


def _load(name: str, root: Path, **data):
    sets = [f"data.name={name}", f"data.root={root}"] + [f"data.{k}={v}" for k, v in data.items()]
    return load_dataset(load_config(None, sets).data)


@PROPERTY
@given(dataset_files(csv_files(("img_id", "img_filename", "y", "split", "place"))))
@example("img_id,img_filename,y,split,place\n1,,0,0,0\n")  # no file name: Path / float
@example("img_id,img_filename,y,split,place\n1,a.jpg,x,0,0\n")  # a label that is no number
@example("img_id,img_filename,y,split,place\n1,a.jpg,5,0,0\n")  # a class with no name
@example("img_id,img_filename,y,split,place\n1,a.jpg,0.5,0,0\n")  # silently truncated to 0
@example(b"")
@example(b"\xff\xfe\x00")
def test_any_waterbirds_metadata_loads_or_fails_in_one_line(content):
    with tempfile.TemporaryDirectory() as folder:
        _write(Path(folder) / "metadata.csv", content)
        loads_or_fails_in_one_line(lambda: _load("waterbirds", Path(folder)))


# The two attributes the default config reads, in any order, now and then with a name twice
# or missing; values mostly 1 / -1.
celeba_names = st.permutations(["Blond_Hair", "Male", "Smiling"]).flatmap(
    lambda names: st.lists(st.sampled_from(["Smiling", "filename", "Male", "x"]), max_size=1).map(
        lambda extra: [n for n in names if n != "x"] + extra))
celeba_values = mostly(st.sampled_from(["1", "-1"]), st.sampled_from(["0", "x", "1.5", "1" + "0" * 30]))


@st.composite
def celeba_files(draw):
    names = draw(celeba_names)
    files = draw(st.lists(st.sampled_from(["000001.jpg", "000002.jpg", "000003.jpg", "a b.jpg"]),
                          min_size=draw(mostly(st.just(1), st.just(0))), max_size=6))
    widths = mostly(st.just(len(names)), st.sampled_from([len(names) - 1, len(names) + 1]))
    rows = [" ".join([f, *(draw(celeba_values) for _ in range(draw(widths)))]) for f in files]
    count = draw(st.sampled_from([str(len(files)), "x", ""]))
    attributes = "\n".join([count, " ".join(names), *rows]) + "\n"
    splits = mostly(st.sampled_from(["0", "1", "2"]), st.sampled_from(["3", "x", "", "0 0"]))
    partition = "\n".join(f"{f} {draw(splits)}" for f in draw(st.permutations(files + ["000009.jpg"])))
    return attributes, partition


@PROPERTY
@given(celeba_files(), dataset_files(st.just("")), st.booleans())
@example(("1\nBlond_Hair Male\n000001.jpg 1 x\n", "000001.jpg 0\n"), b"", False)  # not an integer
@example(("1\nBlond_Hair Male\n000001.jpg 1 1\n", "000001.jpg 3\n"), b"", False)  # partition 3
@example(("1\nBlond_Hair Male\n000001.jpg 1 1\n", ""), b"", False)  # empty partition file
@example(("1\nBlond_Hair Male Male\n000001.jpg 1 1 1\n", "000001.jpg 0\n"), b"", False)  # a name twice
def test_any_celeba_attribute_files_load_or_fail_in_one_line(files, raw, use_raw):
    attributes, partition = files
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _write(root / "list_attr_celeba.txt", raw if use_raw else attributes)
        _write(root / "list_eval_partition.txt", partition)
        loads_or_fails_in_one_line(lambda: _load("celeba", root))


# <age>_<gender>_<race>_<date>.jpg, each field now and then wrong, or a name of no such shape.
utk_names = mostly(
    st.builds(lambda age, gender, race, date, ext: f"{age}_{gender}_{race}_{date}{ext}",
              mostly(st.sampled_from(["25", "0", "39", "199"]), st.sampled_from(["200", "1" + "0" * 25, "x", ""]), 5),
              mostly(st.sampled_from(["0", "1"]), st.sampled_from(["2", "x"]), 5),
              mostly(st.sampled_from(["0", "4"]), st.just(""), 5),
              mostly(st.just("20170116174525125"), st.sampled_from(["x", ""]), 5),
              mostly(st.sampled_from([".jpg", ".jpg.chip.jpg", ".png"]), st.sampled_from([".JPG", ".txt"]), 5)),
    st.text(alphabet="abc_0123.", min_size=1, max_size=12).map(lambda s: s + ".jpg"),
    rolls=4,
)


@PROPERTY
@given(st.lists(utk_names, max_size=6, unique=True), st.sampled_from(["[0, 40, 200]", "[0, 10, 20, 30]"]))
@example(["notes_2.jpg"], "[0, 40, 200]")  # no name matches: an empty table
@example(["1" + "0" * 25 + "_0_0_1.jpg"], "[0, 40, 200]")  # an age past int64
def test_any_utkface_file_names_load_or_fail_in_one_line(names, bins):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for name in names:
            if name not in (".jpg",) and "/" not in name:
                _write(root / name, b"")
        loads_or_fails_in_one_line(lambda: _load("utkface", root, age_bins=bins))


@PROPERTY
@given(dataset_files(csv_files(("path", "label", "attribute", "split"), split=MANIFEST_SPLITS)))
@example("path,label,attribute,split\n")  # a header and no rows
@example("path,label,attribute,split\n1,0,0,train\n")  # numeric paths
@example("path,label,attribute,split\n,0,0,train\n")  # an empty path
@example("path,label,attribute,split\na.jpg,9223372036854775807,0,train\n")  # a class id of 2**63-1
def test_any_manifest_loads_or_fails_in_one_line(content):
    with tempfile.TemporaryDirectory() as folder:
        _write(Path(folder) / "manifest.csv", content)
        loads_or_fails_in_one_line(lambda: _load("manifest", Path(folder)))


@pytest.mark.parametrize("name, files, needle", [
    # These loaded before, wrongly: class 5 made group 10 of 4, and 0.5 was read as class 0.
    ("waterbirds", {"metadata.csv": "img_id,img_filename,y,split,place\n1,a.jpg,5,0,0\n"},
     r"metadata.csv has y '5'; expected an integer from 0 to 1$"),
    ("waterbirds", {"metadata.csv": "img_id,img_filename,y,split,place\n1,a.jpg,0.5,0,0\n"}, r"has y '0.5'"),
    ("waterbirds", {"metadata.csv": "img_id,img_filename,y,split,place\n1,,0,0,0\n"}, r"row 1 has no img_filename"),
    ("waterbirds", {"metadata.csv": b"\xff\xfe"}, r"metadata.csv is not a readable CSV \(.*utf-8.*\)"),
    ("celeba", {"list_attr_celeba.txt": "1\nBlond_Hair Male\n000001.jpg 1 x\n", "list_eval_partition.txt": "000001.jpg 0\n"},
     r"has Male = 'x' for 000001.jpg; expected 1 or -1"),
    # Partition 3 used to leave the image in no split at all.
    ("celeba", {"list_attr_celeba.txt": "1\nBlond_Hair Male\n000001.jpg 1 1\n", "list_eval_partition.txt": "000001.jpg 3\n"},
     r"list_eval_partition.txt has partition '3'; expected an integer from 0 to 2"),
    ("celeba", {"list_attr_celeba.txt": "1\nBlond_Hair Male Male\n000001.jpg 1 1 1\n", "list_eval_partition.txt": ""},
     r"line 2 names the attribute 'Male' twice"),
    ("utkface", {"notes_2.jpg": b""}, r"none of the 1 images under .* is named <age>_<gender 0\|1>_<race>_<date>.jpg"),
    ("manifest", {"manifest.csv": "path,label,attribute,split\n"}, r"manifest.csv has no rows"),
    # A label of 2**63-1 asked for that many class names.
    ("manifest", {"manifest.csv": "path,label,attribute,split\na.jpg,9223372036854775807,0,train\n"},
     r"has label '9223372036854775807'; expected an integer from 0 to 0 \(ids count from 0 without gaps"),
    # One image in train and in test, under two spellings and two labels, leaked test images into training.
    ("manifest", {"manifest.csv": "path,label,attribute,split\nb.jpg,0,0,train\na.jpg,0,1,train\nsub/../a.jpg,1,1,test\n"},
     r"manifest.csv rows 2 and 3 name the same image .*/a.jpg \('a.jpg' label 0 split train; 'sub/../a.jpg' "
     r"label 1 split test\); list each image once$"),
    ("manifest", {"manifest.csv": "path,label,attribute,split\na.jpg,0,0,train\n./a.jpg,0,0,train\nb.jpg,1,1,val\n"},
     r"rows 1 and 2 name the same image .*/a.jpg \('a.jpg' label 0 split train; './a.jpg' label 0 split train\)"),
    ("manifest", {"manifest.csv": "path,label,attribute,split\na.jpg,0,0,train\nb.jpg,1,1,val\na.jpg,0,0,2\n"},
     r"rows 1 and 3 name the same image .*/a.jpg \('a.jpg' label 0 split train; 'a.jpg' label 0 split test\)"),
])
def test_bad_metadata_names_the_file_and_the_value(tmp_path, name, files, needle):
    for file, content in files.items():
        _write(tmp_path / file, content)
    with pytest.raises(FairsynthError, match=needle) as err:
        _load(name, tmp_path)
    assert len(str(err.value).splitlines()) == 1


def test_numeric_manifest_paths_and_a_good_manifest_load(tmp_path):
    _write(tmp_path / "manifest.csv", "path,label,attribute,split\n1,0,1,train\n2,1,0,val\n3,1,1,2\n")
    dataset = _load("manifest", tmp_path)
    assert dataset.records["source"].tolist() == [str(tmp_path / n) for n in ("1", "2", "3")]
    assert dataset.records["group"].tolist() == [1, 2, 3] and dataset.records["split"].tolist() == ["train", "val", "test"]
