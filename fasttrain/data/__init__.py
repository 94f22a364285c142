"""Data: datasets read as uint8 arrays or image files, and the loaders that deliver them to every rank.

sharding.py     THE LOADER CONTRACT: ShardedBatches (every sample once per epoch across ranks, resumable
                mid-epoch), the bookkeeping every loader shares, and the `Loader` protocol training takes
build.py        a run's loaders from its config: this rank's training batches and its share of the test split
auto.py         data.loader=auto: the fastest loader for this device and dataset, and why
loaders/        plain (DataLoader), gpu (resident, batched augmentation), dali and dali_folder (DALI pipelines)
datasets.py     the registered datasets (data.dataset), each one split as arrays; load_split
split.py        what a split is (DatasetInfo) and its seeded subset
cifar.py, mnist.py, synthetic.py   reading (or making) those datasets; array_cache.py: decoded arrays as .npy
folder.py       data.dataset=folder: your own image folders scanned, checked and decoded
folder_scan.py  the folder scanned once per process
transforms.py   the plain loader's torchvision transforms
"""

from fasttrain.data.auto import resolve_loader
from fasttrain.data.build import build_eval_loader, build_loaders, resolve_workers
from fasttrain.data.datasets import load_split, training_sample
from fasttrain.data.folder_scan import FolderSplits, folder_splits, scan_decoder
from fasttrain.data.sharding import Loader, ShardedBatches, ShardLoader
from fasttrain.data.split import DatasetInfo, subset_indices

__all__ = ["DatasetInfo", "FolderSplits", "Loader", "ShardLoader", "ShardedBatches", "build_eval_loader",
           "build_loaders", "folder_splits", "load_split", "resolve_loader", "resolve_workers", "scan_decoder",
           "subset_indices", "training_sample"]
