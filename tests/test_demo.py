"""The main job runs and leaves a valid store."""

import numpy as np

import actstore
from actstore.integrity import store_info, verify
from jobs.demo import DEMO_SCHEMA, run_demo


def test_demo_builds_a_valid_store(tmp_path, capsys):
    path = run_demo(out=str(tmp_path / "demo"))
    assert "integrity: OK" in capsys.readouterr().out
    info = store_info(path)
    assert info["images"] == 256 and info["blocks_complete"] == info["blocks_total"]
    assert verify(path).ok
    ds = actstore.open(path)
    assert ds.image_resid.shape == (len(DEMO_SCHEMA.layers), 256, DEMO_SCHEMA.image_tokens, DEMO_SCHEMA.d_model)
    assert np.isfinite(ds.image_resid.sel(layer=4).values.astype(np.float32)).all()
