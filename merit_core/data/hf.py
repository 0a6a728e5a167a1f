"""Hugging Face ``datasets`` sources: a local dataset directory or a hub id.

``spec.dataset`` is either a directory written by ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk`` (read with ``load_from_disk``; ``spec.split`` picks the
split of a DatasetDict), another local directory or file understood by
``datasets.load_dataset`` (e.g. a folder of JSON/CSV/Parquet files), or a hub id
loaded with ``load_dataset(id, config_name, split=split)``. Where the hub is
unreachable the load fails within seconds (``datasets`` itself retries for ~25 s);
with ``HF_HUB_OFFLINE=1`` only the local cache is used. Rows become examples by the
rule of :mod:`merit_core.data.files`.
"""

from __future__ import annotations

from pathlib import Path

from merit_core._hub import hub_endpoint, hub_offline, hub_reachable
from merit_core.config import SourceSpec
from merit_core.data.errors import DataError, where
from merit_core.data.files import record_to_example
from merit_core.data.types import Example


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _open(spec: SourceSpec):
    import datasets

    ref = spec.dataset or ""
    at = where(spec.name)
    path = Path(ref).expanduser()
    if path.exists():
        try:
            if _is_saved_dataset(path):
                ds = datasets.load_from_disk(str(path))
            else:
                return datasets.load_dataset(str(path), spec.config_name, split=spec.split)
        except Exception as e:
            raise DataError(at + f"cannot load dataset from {path}: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise DataError(at + f"dataset {path} has no split {spec.split!r} (splits: {sorted(ds)})")
            ds = ds[spec.split]
        return ds
    if ref.startswith(("/", ".", "~")):
        raise DataError(at + f"dataset directory {ref} does not exist")
    offline = hub_offline()
    if not offline and not hub_reachable():
        raise DataError(
            at + f"dataset {ref!r} looks like a hub id, but the hub {hub_endpoint()} is unreachable from this "
            "machine. Save the dataset with save_to_disk and set `dataset` to that directory, use a "
            "jsonl/parquet source, or set HF_HUB_OFFLINE=1 to use a cached copy."
        )
    try:
        return datasets.load_dataset(ref, spec.config_name, split=spec.split)
    except Exception as e:
        why = "offline mode is on (HF_HUB_OFFLINE) and no cached copy exists" if offline else str(e)
        what = f"hub dataset {ref!r} (config {spec.config_name!r}, split {spec.split!r})"
        raise DataError(at + f"cannot load {what}: {why}") from None


def load_hf(spec: SourceSpec) -> list[Example]:
    """Examples of a ``datasets`` dataset split, one per row, in dataset order.

    Raises:
        DataError: unknown directory/split, unreachable hub (fast), bad rows (row index).
    """
    ds = _open(spec)
    name = f"dataset {spec.dataset} split {spec.split}"
    local = Path(spec.dataset or "").expanduser()
    base_dir = local if local.is_dir() else None  # relative image paths of a local dataset
    return [record_to_example(row, spec, f"{name} row {i}", base_dir) for i, row in enumerate(ds)]
