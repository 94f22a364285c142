"""Run under torchrun by the tests: one epoch of each named loader on every rank, then rank 0 prints, per
loader, which sample indices each rank saw (labels carry the index), its steps and len(loader), as JSON.
One launch for all the loaders: the process group and the imports are what a launch costs."""

import json
import sys

import numpy as np
import torch
import torch.distributed as torch_dist

from fasttrain.data.loaders.gpu import BatchFormat, CropFlip, GpuLoader
from fasttrain.data.loaders.plain import CustomDataset, PlainLoader
from fasttrain.data.sharding import ShardedBatches


def coverage(kind: str, n: int, batch: int, epoch: int, rank: int, world: int) -> list:
    images = np.zeros((n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n)  # the label is the sample's index
    batches = ShardedBatches(n, batch, shuffle=True, seed=11, rank=rank, world_size=world)
    cpu = torch.device("cpu")
    if kind == "plain":
        from torchvision import transforms as T

        dataset = CustomDataset(images, labels, T.Compose([T.RandomCrop(32, padding=4), T.ToTensor()]), seed=11)
        loader = PlainLoader(dataset, batches, 0, False, False, cpu)
    else:
        from fasttrain.data.loaders.dali import DaliLoader

        cls = GpuLoader if kind == "gpu" else DaliLoader
        loader = cls(images, labels, batches, BatchFormat(cpu, [0.0] * 3, [1.0] * 3), CropFlip(4, True, seed=11))
    loader.set_epoch(epoch)
    seen, steps = [], 0
    for _, y in loader:
        seen += y.tolist()
        steps += 1
    gathered = [None] * world
    torch_dist.all_gather_object(gathered, {"rank": rank, "indices": seen, "steps": steps, "len": len(loader)})
    return gathered


def main(kinds: str, n: int, batch: int, epoch: int) -> None:
    torch_dist.init_process_group("gloo")
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    found = {kind: coverage(kind, n, batch, epoch, rank, world) for kind in kinds.split(",")}
    if rank == 0:
        print(json.dumps(found))
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
