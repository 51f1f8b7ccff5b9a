"""tests/conftest.py's build cache: a build is kept per name and hash of what determines it,
shared by every clone of the same sources, and never kept when it failed."""

import shutil

import pytest

import conftest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, "BUILD_CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def test_a_build_is_kept_under_its_name_and_its_hash(cache):
    source = conftest.CSRC / "philox.h"
    with conftest.cached_build("thing", [source], "-O2") as (directory, done):
        assert not done and directory.parent == cache and directory.name.startswith("thing-")
        (directory / "thing.so").write_bytes(b"built")
    with conftest.cached_build("thing", [source], "-O2") as (again, done):
        assert done and again == directory and (again / "thing.so").exists()
    with conftest.cached_build("thing", [source], "-O3") as (other_flags, done):
        assert not done and other_flags != directory


def test_another_clone_of_the_same_sources_shares_the_build(cache, tmp_path, monkeypatch):
    source = conftest.CSRC / "philox.h"
    with conftest.cached_build("thing", [source]) as (directory, _):
        pass
    clone = tmp_path / "clone"
    (clone / "csrc").mkdir(parents=True)
    shutil.copy(source, clone / "csrc" / "philox.h")
    monkeypatch.setattr(conftest, "ROOT", clone)
    with conftest.cached_build("thing", [clone / "csrc" / "philox.h"]) as (shared, done):
        assert done and shared == directory
    (clone / "csrc" / "philox.h").write_text("// edited\n")
    with conftest.cached_build("thing", [clone / "csrc" / "philox.h"]) as (edited, done):
        assert not done and edited != directory


def test_a_failed_build_is_not_kept(cache):
    source = conftest.CSRC / "philox.h"
    with pytest.raises(RuntimeError):
        with conftest.cached_build("thing", [source]) as (directory, done):
            (directory / "half.o").write_bytes(b"half")
            raise RuntimeError("the compiler failed")
    with conftest.cached_build("thing", [source]) as (again, done):
        assert again == directory and not done and not (again / "half.o").exists()
