"""Large datasets: a tensorflow-datasets builder that writes record JSONL files into ArrayRecord shards
and serves them to Grain as a random-access source (tfds 4.9 builds and reads these without TensorFlow).

Each split file is read with `records.load_records` (so it fails exactly as the JSONL path does), and
every record is stored as its exported JSON in file order (shuffling disabled), so index i of the
ArrayRecord source is line i's record: the same records, in the same order, either way. The builder
config is named by a hash of the files' bytes, so changed files are never served from stale shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds

from bbu_jax.data import records as records_lib


def files_digest(split_files: Mapping[str, str | os.PathLike]) -> str:
  digest = hashlib.sha1()
  for split in sorted(split_files):
    digest.update(split.encode())
    digest.update(pathlib.Path(split_files[split]).read_bytes())
  return digest.hexdigest()[:16]


class BbuRecords(tfds.core.GeneratorBasedBuilder):
  """Record JSONL files (one per split) as ArrayRecord shards of JSON strings."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Records as exported JSON, in file order."}
  def __init__(self, *, split_files: Mapping[str, str | os.PathLike], **kwargs):
    self._split_files = {k: pathlib.Path(v) for k, v in split_files.items()}
    for split, path in self._split_files.items():
      if not path.exists():
        raise FileNotFoundError(f"{path}: no such record file for split {split!r}")
    config = tfds.core.BuilderConfig(name=f"files_{files_digest(self._split_files)}",
                                     description=", ".join(f"{k}={v}" for k, v in self._split_files.items()))
    kwargs.setdefault("file_format", "array_record")
    # Grain's worker processes unpickle the data source, and with it this builder.
    self._init_kwargs = dict(split_files={k: str(v) for k, v in self._split_files.items()}, **kwargs)
    super().__init__(config=config, **kwargs)

  def __getstate__(self):
    return {"_init_kwargs": self._init_kwargs}

  def __setstate__(self, state):
    self.__init__(**state["_init_kwargs"])

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({"record": tfds.features.Text(), "line": np.int64}),
        # Index i must be line i's record (sample_ids in batches are indices into the source).
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(path) for split, path in self._split_files.items()}

  def _generate_examples(self, path: pathlib.Path):
    records, _ = records_lib.load_records(path, on_error="raise")
    for index, record in enumerate(records):
      text = json.dumps(records_lib.export_record(record), ensure_ascii=False)
      yield index, {"record": text, "line": index}


class RecordDataSource:
  """Random access to normalized records over a tfds ArrayRecord data source (Grain-compatible)."""

  def __init__(self, data_source, name: str = "array_record"):
    self._source = data_source
    self._name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    example = self._source[int(index)]
    text = example["record"]
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return records_lib.normalize_record(json.loads(text), source=(self._name, int(example["line"]) + 1))

  def __repr__(self) -> str:
    return f"RecordDataSource({self._name}, {len(self)} records)"


def build_array_record(split_files: Mapping[str, str | os.PathLike], data_dir: str | os.PathLike
                       ) -> BbuRecords:
  """Writes the shards (once per distinct file contents) and returns the prepared builder."""
  builder = BbuRecords(split_files=split_files, data_dir=os.fspath(data_dir))
  builder.download_and_prepare()
  return builder


def record_source(builder: BbuRecords, split: str) -> RecordDataSource:
  """The split as a random-access source of normalized records (`builder.as_data_source(split)`)."""
  return RecordDataSource(builder.as_data_source(split), name=f"{builder.name}/{builder.builder_config.name}:{split}")
