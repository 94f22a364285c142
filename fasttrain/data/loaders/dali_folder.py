"""The DALI folder loader: a user's own JPEG/PNG files decoded and augmented by one DALI pipeline per rank.

Where the bytes come from, and why: an external source reads the encoded files of each batch
(`np.fromfile`) in the order of the `ShardedBatches` plan it is given, and `fn.decoders.image*`
decodes them: on a GPU with device="mixed" (nvJPEG; the hardware JPEG decoder where the GPU has
one), on the CPU with device="cpu". DALI's own `fn.readers.file(shard_id, num_shards)` was not
used: it shards a fixed file list into contiguous blocks, shuffles within a buffer, and pads or
drops at the shard ends, so neither "every sample once per epoch across ranks", nor exact
evaluation with nothing padded, nor resuming in the middle of an epoch would be the contract the
other loaders keep (`fasttrain.data.sharding`). With the plan deciding the order, they are: rank r
decodes exactly `batches.shard()`, in its order, from `start_sample` on; batches at the end of an
epoch may be short (DALI accepts a smaller batch from an external source), and nothing is padded.

Augmentation, in the pipeline, on the pipeline's device:
- train: a random resized crop (area 8-100% of the image, aspect ratio 3/4-4/3, as torchvision's
  RandomResizedCrop; a crop that would leave the image is clipped to it instead of redrawn), decoded
  as a region of interest (`fn.decoders.image_slice`: only that part of a JPEG is decoded), resized
  to image_size x image_size (linear, antialiased), mirrored when `hflip` draws it, normalized;
- train with crop_padding = p > 0 (aug.crop_padding): the image fitted as for eval, zero-padded by p
  and randomly cropped back to image_size, mirrored when drawn, normalized: the crops and flips the
  gpu loader draws (fasttrain.data.loaders.gpu.epoch_augmentation) for the same fitted images;
- eval: the shorter side resized to image_size, the centre image_size x image_size cropped, normalized.
Every image decodes to 3 channels (grayscale, palette and RGBA PNGs included; alpha is dropped).
Each sample's crop and flip are drawn on the host from (seed, epoch) for the whole split and
indexed by sample, so they depend on neither the world size nor where an epoch was resumed; the
crop is turned into the image's own coordinates in the pipeline (`fn.peek_image_shape` reads
only the file's header).

Batches come out as the other loaders' do (fasttrain.data.loaders.gpu.BatchFormat): images (B, 3, S, S)
on the device in its dtype (channels_last storage when asked; DALI has no bfloat16, so bf16 is a
cast on the device), labels int64 on the device.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Deque, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fasttrain.data.loaders.dali import DaliPipelineLoader, as_batch, import_dali
from fasttrain.data.folder import FolderIndex, UnreadableImage, undecodable_line
from fasttrain.data.loaders.gpu import BatchFormat, CropFlip, alternating_flips, epoch_augmentation
from fasttrain.data.sharding import ShardedBatches

CROP_AREA = (0.08, 1.0)  # fraction of the image's area a training crop covers (torchvision's scale)
CROP_RATIO = (3 / 4, 4 / 3)  # its width / height (torchvision's ratio), drawn log-uniformly
PREFETCH_BATCHES = 2  # batches DALI decodes ahead of the one being consumed
CHECK_BATCH = 64  # files decoded together by `undecodable`; a batch that fails is decoded again file by file


# --------------------------------------------------------------------------- which files DALI decodes


def _decoder_device(device: torch.device) -> Tuple[str, Optional[int]]:
    """(the decoders' device argument, the pipeline's device_id) for a loader on `device`."""
    if device.type != "cuda":
        return "cpu", None  # device_id=None: a pipeline without a GPU
    return "mixed", device.index if device.index is not None else torch.cuda.current_device()


class _DecodeCheck:
    """A pipeline that only decodes: files fed in, nothing read out. DALI invalidates a pipeline whose
    run failed, so a new one is built after each failure."""

    def __init__(self, device: torch.device, num_threads: int):
        self.dali, self.fn, self.types = import_dali()
        self.decoder, self.device_id = _decoder_device(device)
        self.num_threads = max(1, num_threads)
        self._pipe = None

    def _build(self):
        fn, types = self.fn, self.types

        @self.dali.pipeline_def(batch_size=CHECK_BATCH, num_threads=self.num_threads, device_id=self.device_id,
                                prefetch_queue_depth=1)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            # the whole image, as the loader's eval pipeline decodes it: a file that decodes whole also
            # decodes as any of the training crops (fn.decoders.image_slice decodes a part of it)
            return fn.decoders.image(encoded, device=self.decoder, output_type=types.RGB)

        pipe = pipeline()
        pipe.build()
        return pipe

    def decodes(self, paths: Sequence[str]) -> Optional[str]:
        """None when DALI decodes every file of `paths` (at most CHECK_BATCH), else DALI's reason."""
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.feed_input("encoded", [np.fromfile(path, dtype=np.uint8) for path in paths])
            self._pipe.run()
            return None
        except RuntimeError as err:
            pipe, self._pipe = self._pipe, None
            pipe._shutdown()  # DALI: "Current pipeline object is no longer valid"
            return _dali_reason(err)

    def close(self) -> None:
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            pipe._shutdown()


def _dali_reason(err: RuntimeError) -> str:
    """DALI's own words for a failed decode, one line: what follows its "encountered:" (e.g. "nvImageCodec
    failure: '#4'" for a GIF), without the operator's traceback around it."""
    lines = [line.strip() for line in str(err).splitlines()]
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
    said = next((line for line in after if line and "no longer valid" not in line), "")
    return f"DALI's image decoder fails on it: {said.rstrip(' :')}" if said else "DALI's image decoder fails on it"


def undecodable(paths: Sequence[str], device: torch.device, num_threads: int = 2) -> List[Optional[str]]:
    """For each file, None when the dali loader's decoder (on `device`: the CPU's, or "mixed" on a GPU)
    decodes it, else why not. data.skip_bad_images uses this to leave out what the dali loader would
    fail on: PIL reads files that DALI refuses (a GIF or an icon named .png), and the other way round.
    Files are decoded CHECK_BATCH at a time; only a batch that fails is decoded again one by one."""
    check = _DecodeCheck(device, num_threads)
    reasons: List[Optional[str]] = [None] * len(paths)
    try:
        for start in range(0, len(paths), CHECK_BATCH):
            batch = paths[start : start + CHECK_BATCH]
            if check.decodes(batch) is None:
                continue
            for offset, path in enumerate(batch):
                reasons[start + offset] = check.decodes([path])
    finally:
        check.close()
    return reasons


def epoch_crops(seed: int, epoch: int, num_samples: int, hflip: bool,
                alternate: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Every sample's training crop and flip for one epoch, drawn on the host from (seed, epoch):
    (crop (N, 4) float32 as [area fraction, log aspect ratio, horizontal position, vertical
    position], positions in 0..1 of the room the crop leaves; mirror (N,) int32, 1 = flip; every other
    epoch with `alternate`, as the gpu loader's alternating_flips)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 104_729)
    uniform = torch.rand((num_samples, 5), generator=gen, dtype=torch.float64).numpy()
    low, high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    crop = np.stack([CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * uniform[:, 0],
                     low + (high - low) * uniform[:, 1], uniform[:, 2], uniform[:, 3]], axis=1)
    mirror = (uniform[:, 4] < 0.5) if hflip else np.zeros(num_samples, dtype=bool)
    if hflip and alternate:
        mirror = alternating_flips(seed, epoch, num_samples).numpy()
    return crop.astype(np.float32), mirror.astype(np.int32)


class _EpochFiles:
    """What the external source pulls: this rank's batches of the current epoch as encoded file bytes
    and labels, plus each sample's crop (epoch_crops, or padded-crop anchors) and flip when training.
    The generator body runs when DALI asks for the epoch's first batch, i.e. after set_epoch; `stop`
    ends the epoch early (a consumer that stopped). `fed` holds the paths of the batches handed to
    DALI and not yet returned by it, oldest first."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, batches: ShardedBatches, train: bool, aug: CropFlip):
        # the plan and the file list only, not the loader: a pipeline holding its loader would be a
        # reference cycle that keeps DALI's threads alive until the garbage collector runs
        self.paths, self.labels, self.batches = paths, labels, batches
        self.train, self.crop_padding, self.hflip, self.seed = train, aug.crop_padding, aug.hflip, aug.seed
        self.alternate = aug.alternate
        self.stop = False
        self.fed: Deque[Tuple[str, ...]] = deque()

    def _augmentation(self) -> Tuple[np.ndarray, ...]:
        """Every sample's crop and flip for this epoch (nothing for evaluation)."""
        epoch, count = self.batches.epoch, len(self.labels)
        if not self.train:
            return ()
        if self.crop_padding == 0:
            return epoch_crops(self.seed, epoch, count, self.hflip, self.alternate)
        # the gpu loader's draws (fasttrain.data.loaders.gpu): the same crops and flips of the same fitted images
        corners, flips = epoch_augmentation(self.seed, epoch, count, self.crop_padding, self.hflip, self.alternate)
        anchors = (corners.numpy() - self.crop_padding).astype(np.int32)  # (row, col); may be negative: padding
        return anchors, flips.numpy().astype(np.int32)

    def __iter__(self) -> Iterator[Tuple[np.ndarray, ...]]:
        shard = self.batches.shard().numpy()
        augmentation = self._augmentation()
        size = self.batches.batch_size
        self.fed.clear()
        for start in range(0, len(shard), size):
            if self.stop:
                return  # the pipeline raises StopIteration once what it prefetched is consumed
            index = shard[start : start + size]
            self.fed.append(tuple(self.paths[i] for i in index))
            encoded: List[np.ndarray] = [np.fromfile(self.paths[i], dtype=np.uint8) for i in index]
            yield (encoded, self.labels[index], *(per_sample[index] for per_sample in augmentation))


class DaliFolderLoader(DaliPipelineLoader):
    """Loader contract as in `fasttrain.data.sharding`: (images, labels) on the device, set_epoch, len, close.

    index: the split's files and labels (fasttrain.data.folder.FolderIndex: `paths`, `labels`).
    batches: this rank's plan over len(index.paths) samples (sharded by global rank; exact for eval).
    fmt: device (cuda:i decodes with device="mixed" on GPU i; cpu decodes on the CPU, device_id=None),
        mean and std of pixels in [0, 1] (3 values: images decode to RGB), dtype, channels_last.
    image_size: the side of the square images delivered.
    train: a random crop and optional flip, both from (seed, epoch, sample); else the image fitted to
        image_size (shorter side resized to it, centre cropped).
    aug: what training draws, from its seed (the run's seed): crop_padding 0 = the random resized crop,
        p > 0 = the fitted image zero-padded by p and randomly cropped back to image_size (aug.crop_padding's
        RandomCrop, drawn as the gpu loader draws it); hflip: mirror half of the training images.
    num_threads: DALI's CPU worker threads (decoding, on the CPU).
    """

    def __init__(self, index: FolderIndex, batches: ShardedBatches, fmt: BatchFormat, image_size: int,
                 train: bool, aug: CropFlip = CropFlip(hflip=True), num_threads: int = 2):
        if len(fmt.mean) != 3 or len(fmt.std) != 3:
            raise ValueError(f"the DALI folder loader decodes RGB: mean and std need 3 values each, got "
                             f"mean={list(fmt.mean)} std={list(fmt.std)}")
        if image_size < 1 or aug.crop_padding < 0:
            raise ValueError(f"image_size must be >= 1 and crop_padding >= 0, got {image_size} and {aug.crop_padding}")
        if batches.num_samples != len(index.paths):
            raise ValueError(f"the batch plan covers {batches.num_samples} samples but the index holds "
                             f"{len(index.paths)} files")
        # the pipeline: built at the first iteration
        super().__init__(index.labels, batches, fmt, aug.seed, num_threads)
        self.paths = tuple(index.paths)
        self.image_size = image_size
        self.train, self.crop_padding, self.hflip = train, aug.crop_padding, aug.hflip
        self._source = _EpochFiles(self.paths, self.labels, batches, train, aug)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    # ------------------------------------------------------------------ the pipeline
    def _fitted_images(self, encoded, decoder: str):
        """Each image decoded whole, its shorter side resized to image_size, the centre cropped."""
        fn, size = self.fn, self.image_size
        images = fn.decoders.image(encoded, device=decoder, output_type=self.types.RGB)
        return fn.crop(fn.resize(images, resize_shorter=size), crop=(size, size))  # crop_pos 0.5, 0.5: the centre

    def _resized_crops(self, encoded, crop, decoder: str):
        """Random resized crop of each encoded image, from its (area, log ratio, x, y) draw."""
        fn, types, dmath = self.fn, self.types, self.dali.math
        shape = fn.peek_image_shape(encoded, dtype=types.FLOAT)  # (H, W, C) from the header, on the CPU
        height, width = shape[0], shape[1]
        area, ratio = crop[0], dmath.exp(crop[1])
        # crop width and height as fractions of the image's: w*h = area, (w*W)/(h*H) = ratio; at least
        # one pixel, at most the whole image (clipped where torchvision would draw again)
        rel_width = dmath.clamp(dmath.sqrt(area * ratio * height / width), 1.0 / width, 1.0)
        rel_height = dmath.clamp(dmath.sqrt(area / ratio * width / height), 1.0 / height, 1.0)
        anchor = fn.stack(crop[2] * (1.0 - rel_width), crop[3] * (1.0 - rel_height))  # "WH" order, as image_slice's
        images = fn.decoders.image_slice(encoded, anchor, fn.stack(rel_width, rel_height), device=decoder,
                                         output_type=types.RGB)
        return fn.resize(images, resize_x=self.image_size, resize_y=self.image_size)

    def _build(self):
        fn, types = self.fn, self.types
        on_gpu = self.device.type == "cuda"
        decoder = "mixed" if on_gpu else "cpu"  # mixed: the file bytes go in on the host, pixels come out on the GPU
        out_type = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT
        layout = "HWC" if self.channels_last else "CHW"
        size = self.image_size
        device_id = None  # the CPU
        if on_gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()

        @self.dali.pipeline_def(batch_size=self.batches.batch_size, num_threads=self.num_threads,
                                device_id=device_id, seed=self.seed,
                                prefetch_queue_depth=PREFETCH_BATCHES)
        def pipeline():
            if not self.train:
                encoded, labels = fn.external_source(source=self._source, num_outputs=2, cycle="raise", batch=True,
                                                     ndim=[1, 0], dtype=[types.UINT8, types.INT64])
                images, mirror = self._fitted_images(encoded, decoder), 0
            else:
                crop_type = types.INT32 if self.crop_padding else types.FLOAT  # anchors, or epoch_crops' draws
                encoded, labels, crop, mirror = fn.external_source(
                    source=self._source, num_outputs=4, cycle="raise", batch=True, ndim=[1, 0, 1, 0],
                    dtype=[types.UINT8, types.INT64, crop_type, types.INT32])
                if self.crop_padding:
                    # the window may start at -padding: pixels outside the image are zero, as RandomCrop(padding=p)'s
                    images = fn.slice(self._fitted_images(encoded, decoder), start=crop, shape=[size, size],
                                      axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
                else:
                    images = self._resized_crops(encoded, crop, decoder)
            images = fn.crop_mirror_normalize(images, mirror=mirror, mean=self.mean, std=self.std,
                                              output_layout=layout, dtype=out_type)
            return images, labels.gpu() if on_gpu else labels

        pipe = pipeline()
        pipe.build()
        return pipe

    # ------------------------------------------------------------------ epochs
    def _run(self):
        """The pipeline's next batch (StopIteration at the epoch's end). A file DALI cannot decode (a
        truncated JPEG or a GIF named .png pass a scan that reads headers only) ends the epoch with the
        plain loader's one UnreadableImage line naming it: DALI's own message gives at most the sample's
        place in a batch, so the batches it was fed and has not returned are decoded again, by the same
        decoder, to find the file."""
        try:
            outputs = self._pipe.run()
        except RuntimeError as err:
            suspects = [path for batch in self._source.fed for path in batch]
            self.close()  # DALI: "Current pipeline object is no longer valid"
            for path, reason in zip(suspects, undecodable(suspects, self.device, self.num_threads)):
                if reason is not None:
                    raise UnreadableImage(undecodable_line(path, reason)) from None
            raise  # every file it was fed decodes on its own: not a file's fault, DALI's own error
        self._source.fed.popleft()
        return outputs

    def _finish_epoch(self) -> None:
        """Run out what the pipeline prefetched of the current epoch, then rewind it for the next."""
        try:
            while True:
                self._run()
        except StopIteration:
            self._pipe.reset()
        self._source.stop = False
        self._mid_epoch = False

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self._pipe is None:
            self._pipe = self._build()
        elif self._mid_epoch:
            # the last epoch was left early: read no more of its files, only the prefetched batches
            self._source.stop = True
            self._finish_epoch()
        self._mid_epoch = True
        for _ in range(self.batches.batches_left()):
            # the host waits here for DALI's batch (decoded ahead); no wait on the training stream:
            # on a GPU the copy below is queued on the current stream
            images, labels = self._run()
            yield as_batch(images, labels, self.device, self.dtype, self.channels_last)
        self._finish_epoch()  # the source is exhausted: the next run raises StopIteration and the pipeline rewinds

    def close(self) -> None:
        """Stop the pipeline's threads (and free its device memory); a later iteration builds a new one."""
        super().close()
        self._source.stop = False
        self._source.fed.clear()
