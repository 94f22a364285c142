"""The `dali` loader: one NVIDIA DALI pipeline per rank over the in-memory uint8 split.

An external source feeds each batch (this rank's images as uint8 HWC, labels, and every
sample's crop corner and flip); DALI pads-and-crops (`fn.slice`, zeros outside the image; for
aug.crop_padding_mode=reflect the source holds a copy of the split mirrored at its edges once, since
`fn.slice` pads with a constant only, and the window then stays inside it), flips
and normalizes (`fn.crop_mirror_normalize`) into NCHW, or NHWC for channels_last. The sample
order comes from the same `ShardedBatches` plan as the other loaders (sharded by global rank over
`world size` shards, a fresh permutation per epoch from the seed, equal steps on every rank,
exact evaluation), and the crops and flips from the same per-epoch draws as the `gpu` loader, so
the three loaders see the same data and the `dali` and `gpu` loaders produce identical pixels.
Everything is a function of (seed, epoch): resuming at an epoch replays it exactly.

On CUDA the operators run on the GPU and batches reach PyTorch by a device-to-device copy on the
current stream; without a GPU the pipeline runs on the CPU (`device_id=None`), which is how CI
tests it. DALI has no bfloat16: under bf16 it emits float32 and the cast happens on the device.
"""

from __future__ import annotations

import importlib
from typing import Iterator, Tuple

import numpy as np
import torch

from fasttrain.data.loaders.gpu import BatchFormat, CropFlip, epoch_augmentation
from fasttrain.data.sharding import ShardedBatches, ShardLoader
from fasttrain.errors import UserError

INSTALL_HINT = ("pip install nvidia-dali-cuda130 (CUDA 12: nvidia-dali-cuda120), or pip install 'fasttrain[dali]'; "
                "or choose data.loader=gpu, plain or auto")


def dali_available() -> bool:
    try:
        importlib.import_module("nvidia.dali")  # a real import: a broken install counts as unavailable
    except ImportError:
        return False
    return True


def import_dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError:
        raise UserError(f"data.loader=dali needs NVIDIA DALI, which is not installed: {INSTALL_HINT}") from None
    return dali, fn, types


class _EpochSource:
    """What the external source pulls: this epoch's batches, computed when the epoch's first batch
    is requested (a generator body runs lazily), i.e. after set_epoch. It holds the arrays and the plan,
    not the loader: the pipeline holds its source, and a source holding the loader would be a reference
    cycle (loader -> pipeline -> source -> loader) that keeps DALI's threads and buffers alive until the
    garbage collector happens to run."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batches: ShardedBatches, aug: CropFlip):
        self.images, self.labels, self.batches = images, labels, batches
        self.seed, self.crop_padding, self.hflip, self.alternate = aug.seed, aug.crop_padding, aug.hflip, aug.alternate
        # reflect: the slice's start is then the corner itself, inside the padded copy (its size: the split's
        # x (1 + 2p/side)^2, 1.27x for CIFAR-10 with p=2)
        self.reflected = aug.padding_mode == "reflect" and aug.crop_padding > 0
        if self.reflected:
            p = aug.crop_padding
            self.images = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        shard = self.batches.shard().numpy()
        corners, flips = epoch_augmentation(self.seed, self.batches.epoch, len(self.labels), self.crop_padding,
                                            self.hflip, self.alternate)
        # slice start in the fed image: may be negative (zeros: DALI pads), or the corner in the mirrored copy
        anchors = (corners.numpy() - (0 if self.reflected else self.crop_padding)).astype(np.int32)
        mirror = flips.numpy().astype(np.int32)
        size = self.batches.batch_size
        for start in range(0, len(shard), size):
            index = shard[start : start + size]
            yield self.images[index], self.labels[index], anchors[index], mirror[index]


class DaliPipelineLoader(ShardLoader):
    """What the DALI loaders share: the batch format, the labels, the plan, and a pipeline built at
    the first iteration."""

    def __init__(self, labels: np.ndarray, batches: ShardedBatches, fmt: BatchFormat, seed: int, num_threads: int):
        self.dali, self.fn, self.types = import_dali()
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.batches = batches
        self.device = fmt.device
        self.mean = [255.0 * m for m in fmt.mean]  # DALI normalizes raw 0..255 pixels
        self.std = [255.0 * s for s in fmt.std]
        self.dtype = fmt.dtype
        self.channels_last = fmt.channels_last
        self.seed = seed
        self.num_threads = max(1, num_threads)
        self._pipe = None
        self._mid_epoch = False  # a consumer stopped early: the pipeline must be run out before reuse

    def close(self) -> None:
        """Stop the pipeline's threads and free its buffers (device memory on a GPU) now, not whenever the
        loader is collected; a later iteration builds a new pipeline. The trainer calls it on every way out."""
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            pipe._shutdown()  # what Pipeline.__del__ does; DALI has no public close
        self._mid_epoch = False


class DaliLoader(DaliPipelineLoader):
    """Loader contract as in `fasttrain.data.sharding`: (images, labels) on the device, set_epoch, len."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batches: ShardedBatches, fmt: BatchFormat,
                 aug: CropFlip = CropFlip(), num_threads: int = 2):
        super().__init__(labels, batches, fmt, aug.seed, num_threads)
        self.images = images  # (N, H, W, C) uint8, read-only, shared
        self.crop_padding, self.hflip = aug.crop_padding, aug.hflip
        self._source = _EpochSource(images, self.labels, batches, aug)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def _build(self):
        fn, types = self.fn, self.types
        on_gpu = self.device.type == "cuda"
        height, width = self.images.shape[1:3]
        half = self.dtype == torch.float16

        @self.dali.pipeline_def(batch_size=self.batches.batch_size, num_threads=self.num_threads,
                                device_id=self.device.index if on_gpu else None, seed=self.seed,
                                prefetch_queue_depth=2)
        def pipeline():
            images, labels, anchors, mirror = fn.external_source(
                source=self._source, num_outputs=4, cycle="raise", batch=True,
                layout=["HWC", "", "", ""])
            if on_gpu:
                images, labels = images.gpu(), labels.gpu()
            # the crop window may start at -padding: out-of-bounds pixels are zero, as with RandomCrop(padding=p)
            cropped = fn.slice(images, start=anchors, shape=[height, width], axis_names="HW",
                               out_of_bounds_policy="pad", fill_values=0)
            out = fn.crop_mirror_normalize(cropped, mirror=mirror, mean=self.mean, std=self.std,
                                           output_layout="HWC" if self.channels_last else "CHW",
                                           dtype=types.FLOAT16 if half else types.FLOAT)
            return out, labels

        pipe = pipeline()
        pipe.build()
        return pipe

    def _drain(self) -> None:
        """Run out the pipeline's current epoch (after an early stop) and rewind it."""
        try:
            while True:
                self._pipe.run()
        except StopIteration:
            self._pipe.reset()
        self._mid_epoch = False

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self._pipe is None:
            self._pipe = self._build()
        elif self._mid_epoch:
            self._drain()
        self._mid_epoch = True
        for _ in range(self.batches.batches_left()):
            images, labels = self._pipe.run()
            yield as_batch(images, labels, self.device, self.dtype, self.channels_last)
        try:
            self._pipe.run()  # the source is exhausted: this raises, and the pipeline rewinds
        except StopIteration:
            self._pipe.reset()
            self._mid_epoch = False


def to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """One DALI output as a torch tensor on `device`: copied device to device on a GPU, else on the host."""
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=_torch_dtype(dense.dtype), device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))  # device to device
        return out
    return torch.from_numpy(np.array(tensor_list.as_tensor()))  # a copy: DALI reuses its buffers


def as_batch(images, labels, device: torch.device, dtype: torch.dtype,
             channels_last: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """A pipeline's (images, labels) as the loader contract's batch: NCHW in `dtype`, int64 labels."""
    x = to_torch(images, device)
    if channels_last:
        x = x.permute(0, 3, 1, 2)  # NHWC storage viewed as NCHW: exactly channels_last
    if x.dtype != dtype:
        x = x.to(dtype)  # bf16: DALI has none; the cast keeps channels_last
    return x, to_torch(labels, device).to(device).view(-1)


def _torch_dtype(dali_dtype) -> torch.dtype:
    import nvidia.dali.types as types

    return {types.FLOAT: torch.float32, types.FLOAT16: torch.float16, types.INT64: torch.int64,
            types.UINT8: torch.uint8, types.INT32: torch.int32}[dali_dtype]
