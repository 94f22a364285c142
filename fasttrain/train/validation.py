"""Validation at training speed: the test split through the model (compiled when training compiles, on
CUDA replayed as one graph when training captures its step), test-time augmentation, sums kept on the
device and read once per pass.

With a compiled model every batch has one shape: the last, smaller batch of a rank's share is padded to
the eval batch with zero images labelled -1, which the loss ignores and no prediction matches, so the
sums count each real image once and nothing is recompiled for a second shape. On CUDA with
train.capture=true the batch's work (views, forward, loss, argmax, sums) is recorded once as a CUDA graph
after two warm-up batches and replayed for every batch: per batch the host copies the batch into the
graph's inputs and launches one replay. The weights (and an EMA's) are updated in place between passes,
so the recorded graph reads them where they are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fasttrain.train import cuda_graphs
from fasttrain import dist
from fasttrain.train.precision import Precision

IGNORED = -1  # the label of a padding image: no loss, never a correct prediction
WARMUP_BATCHES = 2  # run for real before a CUDA graph records the eval batch (compilation, autotuning)


@dataclass
class EvalStats:
    loss: float  # mean loss per sample
    accuracy: float  # fraction in [0, 1]
    correct: int
    total: int
    compile_seconds: float = 0.0  # of the pass's time: the first batch, where compilation happened


# each view's weight in the logits' average (views in tta_views' order). flip_shift weighs as the CIFAR-10 speed
# records publish (airbench, arXiv 2404.00498): the image and its mirror half of the total, the four shifted
# views the other half: 1/4, 1/4, then 1/8 each
TTA_WEIGHTS = {"none": (1.0,), "flip": (0.5, 0.5), "flip_shift": (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)}


def tta_views(images: torch.Tensor, tta: str) -> List[torch.Tensor]:
    """The views whose logits are averaged (TTA_WEIGHTS): the image (none); and its mirror (flip); and the image
    shifted one pixel down-right and up-left with the edge reflected, and the mirrors of those two (flip_shift: 6
    views, as the speed records take them: every view's mirror is among them)."""
    if tta == "none":
        return [images]
    views = [images, images.flip(-1)]
    if tta == "flip_shift":
        height, width = images.shape[-2:]
        padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :height, :width], padded[..., 2:, 2:]]  # content moved down-right, up-left
        views += shifted + [view.flip(-1) for view in shifted]
    return views


def tta_logits(model: nn.Module, images: torch.Tensor, tta: str) -> torch.Tensor:
    """The weighted mean of the model's logits over the views (TTA_WEIGHTS; one forward over all of them)."""
    views = tta_views(images, tta)
    if len(views) == 1:
        return model(images)
    logits = model(torch.cat(views).contiguous(memory_format=_format_of(images)))
    weights = torch.tensor(TTA_WEIGHTS[tta], dtype=torch.float32, device=logits.device).view(-1, 1, 1)
    return (logits.float().view(len(views), images.shape[0], -1) * weights).sum(dim=0)


def _format_of(images: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) \
        and not images.is_contiguous() else torch.contiguous_format


class Evaluator(cuda_graphs.GraphCapture):
    """`evaluator(loader)` -> EvalStats over every rank's share of the split (each image counted once).

    `model`: what evaluation runs (the trained module or an EMA's copy; never DDP-wrapped: ranks may run
    different numbers of batches). `compile_mode`: None = eager, else torch.compile's mode for the whole
    batch function. `pad_to`: the eval batch, to which a smaller last batch is padded when compiled.
    `capture`: record the batch function as a CUDA graph (CUDA only; needs `pad_to`)."""

    def __init__(self, model: nn.Module, precision: Precision, tta: str = "none", compile_mode: Optional[str] = None,
                 compiled: bool = False, pad_to: int = 0, capture: bool = False):
        self.model, self.precision, self.tta = model, precision, tta
        self.device = precision.device
        self.pad_to = pad_to if compiled else 0
        self.capture = capture and compiled and self.device.type == "cuda" and pad_to > 0
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # [loss sum, correct, images]
        self.compiled = compiled
        self._body = torch.compile(self._batch_sums, mode=compile_mode) if compiled else self._batch_sums
        self.passes = 0
        self.batches_run = 0
        self.replay: Optional[Callable[[], None]] = None
        self.static_images: Optional[torch.Tensor] = None
        self.static_labels: Optional[torch.Tensor] = None

    def _batch_sums(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with self.precision.autocast():
            logits = tta_logits(self.model, images, self.tta)
        logits = logits.float()
        self.sums[0] += F.cross_entropy(logits, labels, ignore_index=IGNORED, reduction="sum").double()
        self.sums[1] += (logits.argmax(dim=1) == labels).sum()
        self.sums[2] += (labels != IGNORED).sum()

    @torch.no_grad()
    def __call__(self, loader: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> EvalStats:
        self.model.eval()
        self.sums.zero_()
        first = self.passes == 0 and self.compiled
        compile_seconds = 0.0
        start = time.perf_counter()
        for images, labels in loader:
            if self.pad_to and labels.shape[0] < self.pad_to:  # shape is host metadata: no sync
                images, labels = _padded(images, labels, self.pad_to)
            self._run(images, labels)
            if first:
                first = False
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # host sync, once per process: time the compilation
                compile_seconds = time.perf_counter() - start
        self.passes += 1
        loss_sum, correct, total = dist.all_reduce_sum_tensor(self.sums.clone()).tolist()  # host sync, once per pass
        correct, total = int(correct), int(total)
        return EvalStats(loss_sum / max(total, 1), correct / max(total, 1), correct, total, compile_seconds)

    def _run(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if not self.capture:
            self._body(images, labels)
            return
        if self.replay is not None and images.shape == self.static_images.shape:
            self.static_images.copy_(images)  # the graph reads its inputs from fixed addresses
            self.static_labels.copy_(labels)
            self.replay()
            return
        if self.batches_run < WARMUP_BATCHES or images.shape[0] != self.pad_to:
            with self._side_stream():
                self._body(images, labels)
        else:
            self.static_images = images.clone(memory_format=torch.preserve_format)
            self.static_labels = labels.clone()
            self.replay = self._record(lambda: self._body(self.static_images, self.static_labels))
            self.replay()  # the capture recorded this batch's sums without running them
        self.batches_run += 1


def _padded(images: torch.Tensor, labels: torch.Tensor, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The batch grown to `size` rows: zero images labelled IGNORED (same dtype and memory format)."""
    extra = size - labels.shape[0]
    padding = images.new_zeros((extra, *images.shape[1:])).contiguous(memory_format=_format_of(images))
    grown = torch.cat([images, padding]).contiguous(memory_format=_format_of(images))
    return grown, torch.cat([labels, labels.new_full((extra,), IGNORED)])


def validate(model: nn.Module, loader: Iterable[Tuple[torch.Tensor, torch.Tensor]], precision: Precision,
             tta: str = "none") -> EvalStats:
    """One eager pass of `model` over `loader` (fasttrain eval's, and a plain reference)."""
    return Evaluator(model, precision, tta)(loader)
