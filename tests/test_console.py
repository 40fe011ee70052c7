"""A healthy job's console says only what matters. Here: the causes of warnings that are the
project's own (Train's ingest options, the package's license metadata)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_trains_ingest_options_keep_the_order_without_the_deprecated_option():
    import warnings

    from ray.data import DataContext

    from engine.train.stage import _ordered_ingest

    DataContext.get_current()  # Ray Data's own deprecations, on first use, are not ours
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        options = _ordered_ingest()
    assert options.preserve_order
    assert not [w for w in caught if "exclude_resources" in str(w.message)], [str(w.message) for w in caught]


def test_the_license_is_an_spdx_expression_that_setuptools_reads_without_warning(tmp_path):
    """pyproject's license as setuptools builds the package metadata (`pip install -e .`)."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text("")
    build = "from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel('meta'))"
    (tmp_path / "meta").mkdir()
    done = subprocess.run([sys.executable, "-W", "always", "-c", build], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Deprecat" not in done.stderr, done.stderr
    (metadata,) = (tmp_path / "meta").glob("*/METADATA")
    assert "License-Expression: Apache-2.0" in metadata.read_text()
