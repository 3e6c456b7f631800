"""Reading a learner checkpoint without running code from it.

A checkpoint may come from someone else, so loading one must not execute what it holds. What
`torch.distributed.checkpoint` (DCP) reads by default does: its `FileSystemReader` loads
`.metadata` with a plain `pickle.load`, and its `DefaultLoadPlanner` loads the non-tensor items
(the optimizer's param_groups) with `torch.load(weights_only=False)`; only the tensors themselves
are read with `weights_only=True`. Here:
- :class:`SafeReader` unpickles `.metadata` admitting only the classes DCP's metadata is made of
  (:data:`METADATA_GLOBALS`, and torch dtypes); any other global refuses the checkpoint;
- :class:`SafeLoadPlanner` loads non-tensor items with `weights_only=True`;
- :func:`read_rank_state` loads a rank's `rank{r}.pt` (LR schedule, RNG) with `weights_only=True`.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

# Everything a DCP `.metadata` pickle of this torch refers to (found by recording what
# `pickle.load` looks up in real checkpoints): plain dataclasses, enums and torch.Size.
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a dict lookup of a layout by its name
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Finds only the classes of `METADATA_GLOBALS` and torch dtypes; UnpicklingError otherwise."""

    def find_class(self, module: str, name: str) -> Any:
        if name in METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a DCP checkpoint "
                                     f"does not hold: refused (loading it could run code)")


class SafeReader(FileSystemReader):
    """A `FileSystemReader` whose `.metadata` is unpickled with the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """A `DefaultLoadPlanner` that loads non-tensor items only when `weights_only=True` admits them."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)  # raises on anything but plain data and tensors
        value.seek(0)
        super().load_bytes(read_item, value)  # the same in-memory bytes, now known to be plain


def read_rank_state(path: str) -> dict[str, Any]:
    """A rank's `rank{r}.pt`: {"scheduler": state dict, "rng": {"cpu", "cuda"}, "world_size"}."""
    return torch.load(path, weights_only=True)
