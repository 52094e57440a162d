"""Tests for elf_jax.checkpoint (orbax save/load, atomicity, NaN refusal, corruption)."""
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elf_jax.checkpoint import StepCheckpoints, load_tree, read_metadata, save_tree

# tensorstore may report a closed event loop after a deliberately failed restore
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _tree(v=1.0):
    return {
        "params": {"w": jnp.full((3, 4), v), "b": jnp.zeros(4)},
        "stats": [jnp.arange(3, dtype=jnp.int32), jnp.ones((2,), jnp.bfloat16)],
        "epoch": jnp.int32(7),
    }


def _assert_tree_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _data_files(path):
    """Files holding array bytes inside an orbax checkpoint directory."""
    out = []
    for root, _, files in os.walk(path):
        if os.path.basename(root) == "d":
            out += [Path(root) / f for f in files]
    return out


def test_roundtrip_metadata_and_like(tmp_path):
    p = tmp_path / "ck"
    meta = {"teacher": "ConvNet", "epoch": np.int64(3), "shape": (4, 4, 8)}
    save_tree(p, _tree(), meta)
    tree, m = load_tree(p)
    _assert_tree_equal(tree, _tree())
    assert m["teacher"] == "ConvNet" and m["epoch"] == 3 and m["shape"] == [4, 4, 8]
    assert read_metadata(p)["teacher"] == "ConvNet"
    tree2, _ = load_tree(p, like=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                              _tree()))
    _assert_tree_equal(tree2, _tree())
    # expect: matching values (tuples compare as lists) pass
    load_tree(p, expect={"teacher": "ConvNet", "shape": (4, 4, 8)})


def test_expect_mismatch_names_key_and_values(tmp_path):
    p = tmp_path / "ck"
    save_tree(p, _tree(), {"teacher": "ConvNet"})
    with pytest.raises(ValueError, match=r"another teacher \(saved vs asked\): 'ConvNet' vs 'ResNet18'"):
        load_tree(p, expect={"teacher": "ResNet18"})
    with pytest.raises(ValueError, match="no key 'dataset'"):
        load_tree(p, expect={"dataset": "mnist5k"})


def test_overwrite_replaces_and_nan_keeps_good(tmp_path):
    p = tmp_path / "ck"
    save_tree(p, _tree(1.0), {"v": 1})
    save_tree(p, _tree(2.0), {"v": 2})
    tree, m = load_tree(p)
    assert m["v"] == 2 and float(tree["params"]["w"][0, 0]) == 2.0
    bad = _tree(2.0)
    bad["params"]["w"] = bad["params"]["w"].at[1, 2].set(jnp.nan)
    with pytest.raises(ValueError, match=r"\['params'\]\['w'\].*NaN/Inf"):
        save_tree(p, bad, {"v": 3})
    bad["params"]["w"] = jnp.full((3, 4), jnp.inf)
    with pytest.raises(ValueError, match="NaN/Inf"):
        save_tree(p, bad, {"v": 3})
    # the good checkpoint is untouched and no temporary siblings are left behind
    assert load_tree(p)[1]["v"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_failed_save_does_not_replace(tmp_path):
    p = tmp_path / "ck"
    save_tree(p, _tree(1.0), {"v": 1})
    with pytest.raises(ValueError, match="not JSON-serializable"):
        save_tree(p, _tree(5.0), {"v": object()})
    with pytest.raises(Exception):
        save_tree(p, {"x": object()}, {"v": 9})  # orbax cannot serialize this leaf
    tree, m = load_tree(p)
    assert m["v"] == 1 and float(tree["params"]["w"][0, 0]) == 1.0
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_tree(tmp_path / "nope")
    p = tmp_path / "ck"
    save_tree(p, _tree(), {"v": 1})
    files = _data_files(p / "tree")
    assert files
    for f in files:  # truncate the array bytes
        f.write_bytes(f.read_bytes()[:3])
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        load_tree(p)
    save_tree(p, _tree(), {"v": 1})
    (p / "metadata" / "metadata").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        load_tree(p)
    save_tree(p, _tree(), {"v": 1})
    (p / "metadata" / "metadata").unlink()
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        load_tree(p)


def test_crash_between_renames_recovers_old(tmp_path):
    p = tmp_path / "ck"
    save_tree(p, _tree(1.0), {"v": 1})
    os.replace(p, tmp_path / ".ck.old-deadbeef")  # simulate a kill between the two renames
    assert load_tree(p)[1]["v"] == 1
    save_tree(p, _tree(2.0), {"v": 2})
    assert load_tree(p)[1]["v"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_typed_keys_roundtrip(tmp_path):
    st = {"key": jax.random.key(3), "x": jnp.ones(2)}
    save_tree(tmp_path / "k", st, {})
    out, _ = load_tree(tmp_path / "k", like=st)
    assert jax.dtypes.issubdtype(out["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(out["key"]), jax.random.key_data(st["key"]))


def test_step_checkpoints(tmp_path):
    d = tmp_path / "steps"
    sc = StepCheckpoints(d, max_to_keep=2)
    assert sc.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        sc.restore()
    for s in range(4):
        sc.save(s, _tree(float(s)), {"epoch": s})
    assert sc.all_steps() == [2, 3] and sc.latest_step() == 3
    state, meta = sc.restore(like=_tree())
    _assert_tree_equal(state, _tree(3.0))
    assert meta["epoch"] == 3 and meta["step"] == 3
    state, meta = sc.restore(2)
    assert float(state["params"]["w"][0, 0]) == 2.0
    with pytest.raises(FileNotFoundError, match="available steps"):
        sc.restore(0)
    with pytest.raises(ValueError, match="already exists"):
        sc.save(3, _tree(), {})
    bad = _tree()
    bad["params"]["b"] = bad["params"]["b"].at[0].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN/Inf"):
        sc.save(4, bad, {})
    assert sc.latest_step() == 3
    sc.close()
    # a fresh manager (a resumed process) sees the same steps
    sc2 = StepCheckpoints(d, max_to_keep=2)
    assert sc2.latest_step() == 3
    assert sc2.read_meta()["epoch"] == 3
    # corruption: truncated array data, then deleted metadata
    for f in _data_files(d / "3" / "state"):
        f.write_bytes(b"")
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        sc2.restore(3, like=_tree())
    (d / "2" / "metadata" / "metadata").unlink()
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        sc2.restore(2)


def test_restore_latest_good_skips_unreadable_steps(tmp_path, caplog):
    """An unreadable newest step is skipped (a warning names it) and deleted once an older
    step reads back; when none reads back the error is raised and nothing is deleted."""
    sc = StepCheckpoints(tmp_path / "s", max_to_keep=None)
    assert sc.restore_latest_good() is None
    for s in range(3):
        sc.save(s, _tree(float(s)), {"epoch": s})
    for f in _data_files(tmp_path / "s" / "2" / "state"):
        f.write_bytes(b"")
    with caplog.at_level("WARNING", logger="elf_jax.checkpoint"):
        step, state, meta = sc.restore_latest_good(like=_tree())
    assert step == 1 and meta["epoch"] == 1 and "step 2 in " + str(tmp_path / "s") in caplog.text
    _assert_tree_equal(state, _tree(1.0))
    assert sc.all_steps() == [0, 1]  # step 2 can be written again
    def refuse(meta):
        raise ValueError("other settings")

    with pytest.raises(ValueError, match="other settings"):  # a refusal is not corruption
        sc.restore_latest_good(check=refuse)
    assert sc.all_steps() == [0, 1]
    for s in (0, 1):
        for f in _data_files(tmp_path / "s" / str(s) / "state"):
            f.write_bytes(b"")
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        sc.restore_latest_good(like=_tree())
    assert sc.all_steps() == [0, 1]
    sc.close()
