"""The data a run read, as MLflow dataset inputs: one per split (train, val, test), each with
its size and a digest of its contents.

MLflow's runs table and run page show a run's datasets; with a digest per split, two runs that
claim the same data can be checked to have read the same samples (same split seed, same
files), and the sizes say at a glance how much validation a search selected on.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from guidance_tune.config import DataConfig

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput

    from guidance_tune.data.splits import DataSplits

CONTEXT_TAG = "mlflow.data.context"  # MLflow's own tag for a dataset's role in a run


def _source(config: DataConfig) -> tuple[str, str]:
    """MLflow's source type and source: the files a dataset was read from, or the code that
    generates it (digits ships with scikit-learn, the others are drawn from a seed)."""
    from guidance_tune.data.splits import SEQUENCE_LOADERS

    if config.root is not None:
        return "local", json.dumps({"uri": str(config.root)})
    generator = SEQUENCE_LOADERS.get(config.name, f"guidance_tune.data.readers:{config.name}")
    return "code", json.dumps({"tags": {"generator": generator}})


def dataset_inputs(config: DataConfig, splits: DataSplits, *, test: bool) -> list[DatasetInput]:
    """Train and val, and test where the run evaluates on it (``train.evaluate_test``): a
    search trial never reads test, and its record does not say it did."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type, source = _source(config)
    shape = list(splits.input_shape)
    read = [("train", splits.train), ("val", splits.val)] + ([("test", splits.test)] * test)
    inputs = []
    for split, data in read:
        profile = {"num_rows": data.num_samples, "num_classes": splits.num_classes, "shape": shape}
        dataset = Dataset(
            name=f"{config.name}-{split}",
            digest=data.digest(),
            source_type=source_type,
            source=source,
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, split)]))
    return inputs
