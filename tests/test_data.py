"""Data: the loader that overlaps reading data with the device's work (order, one thread, one item ahead, errors), and
data sections that cannot name a dataset."""

from __future__ import annotations

import threading

import pytest

from actstore.data import prefetched


def test_prefetched_loads_the_next_item_on_one_thread_while_the_caller_works():
    started = {k: threading.Event() for k in range(4)}
    loaders = set()

    def load(k: int) -> int:
        loaders.add(threading.get_ident())
        started[k].set()
        return k * 10

    got = []
    for k, loaded in zip(range(4), prefetched(load, range(4))):
        # the next item is being loaded while the caller still holds this one, and nothing beyond it
        assert k == 3 or started[k + 1].wait(timeout=10)
        assert k + 2 > 3 or not started[k + 2].is_set()
        got.append(loaded)
    assert got == [0, 10, 20, 30]
    assert len(loaders) == 1 and threading.get_ident() not in loaders
    assert list(prefetched(load, [])) == []


def test_a_loading_error_reaches_the_caller_at_its_item():
    def load(k: int) -> int:
        if k == 2:
            raise ValueError("image 2 of the data cannot be read")
        return k

    got = []
    with pytest.raises(ValueError, match="image 2"):
        for loaded in prefetched(load, range(5)):
            got.append(loaded)
    assert got == [0, 1]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"source": "webdataset", "path": "shards/"}, r"data.source must be one of \('world', .*, got 'webdataset'"),
        ({"source": "parquet"}, "data.source 'parquet' needs data.path"),
        ({"source": "imagefolder", "path": "images/", "revision": "main"}, "the 'imagefolder' source has neither"),
    ],
)
def test_a_data_section_that_names_no_dataset_is_refused_as_the_config_is_read(tmp_path, data, message):
    """Before any model loads (minutes for a real LM on every rank), not when the data is first opened."""
    import yaml

    from jobs.harvest import HarvestConfig
    from jobs.train_adapter import TrainConfig

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"data": data}))
    for job in (HarvestConfig, TrainConfig):
        with pytest.raises(ValueError, match=message):
            job.from_yaml(config)
