"""One command that proves the GPU paths, inside a budget.

    python -m benchmarks.gpu_check                                 # one GPU: under 8 minutes by construction
    python -m benchmarks.gpu_check --budget 300 --out runs/gpu_check --data-root ../shared/data
    python -m benchmarks.gpu_check --smoke                         # every section, tiny, on the CPU (CI)
    python -m benchmarks.gpu_check --peer-airbench ref/airbench94.py  # the speedrun beside the record's script

Sections run in priority order, each with a budget of its own (seconds, of the default 460): one
is skipped, with a note, when less than its budget is left, and bounds its own work by it. Each
prints one JSON line when it ends; at the end DIR/gpu_check.json holds everything and
DIR/gpu_check.md a table ready to paste into benchmarks/RESULTS.md (card, driver, CUDA, torch,
commit). The exit code is 1 when a section failed, else 0 (skipped sections do not fail).

  1. hidden_syncs (45 s): the real run (schedule, logging, checkpoints, preemption watch) of the fast
     recipe, eager and captured, under torch.cuda.set_sync_debug_mode("warn"); zero syncs allowed
     inside steps and between log intervals (benchmarks/syncs.py).
  2. real_entry (35 s): `python -m fasttrain.run` with configs/cifar10_cnn_fast.yaml for 2 epochs:
     exit code, images/s, compiled graphs flat after epoch 1, no "skipping cudagraphs" and no
     recompilation after epoch 1 (TORCH_LOGS=recompiles).
  3. profile (30 s): the captured fast recipe and its eager compiled rung under torch.profiler with CUDA
     activity, 20 steady steps each: the GPU's busy fraction, kernel time and kernels per step, the top 10
     kernels, the host's CPU time per step, a verdict (host-bound when the GPU is busy < 85%), and the
     bandwidth roofline of CIFAR10_CNN on the card (activation bytes per training image, counted on the
     model); each window's trace kept as DIR/profile-<name>.json (benchmarks/gpu_check/device_profile.py).
  4. speedrun (90 s): configs/cifar10_94.yaml (the speed records' recipe) compiled and captured, for 5
     seeds after one warm-up run: mean and minimum test accuracy (TTA), the training time as the records
     count it (the training steps and the final evaluation; compilation and loading left out: fasttrain's
     time split) and the wall time from process start. With --peer-airbench PATH (the record's own script,
     your fetched copy, never committed) that script on the same data (cifar10/ beside its run) for as many
     runs after its first, and the ratio of the two times (benchmarks/gpu_check/speedrun.py).
  5. ladder (75 s): the tutorial loop (PIL DataLoader, 4 workers), then every fasttrain rung at its
     best batch of a sweep up to 2048 (1024 first, whose compiled graphs the sections before left in
     inductor's cache, then 2048, 512 and 128 while the budget lasts), with images/s, speedup, MFU
     and host ms per step (the training thread's CPU time).
  6. correctness (70 s): the tests marked `cuda` in tests/test_gpu_correctness.py, run by pytest:
     fp16 with a forced overflow counts one skipped step and moves no weight; bf16 tracks fp32 from
     the same weights; stop + resume gives the straight run's weights bit for bit
     (train.deterministic=true); a contiguous checkpoint resumes into channels_last with fused AdamW;
     data.loader=auto chooses and logs. One result per test.
  7. time_to_accuracy (90 s): the case study's accuracy at its 100 epochs (its recipe at batch 128 in
     fasttrain), the tutorial loop's time per epoch over 3 epochs stated for 100, and the fast recipe
     with train.target_acc at that accuracy, from process start, with its time split, cold and warm
     compile cache: "reached the case study's accuracy N x sooner, end to end" (fewer epochs when the
     budget is short: stated).
  8. dali (25 s): the fast recipe with data.loader=dali for one epoch, when nvidia.dali is importable.

Real CIFAR-10 is used when DATA_ROOT/cifar-10-batches-py exists (--data-root; default ../shared/data,
then ./data), else synthetic data of the same shape, and the output says which.

On a machine without network (the GPU image holds torch, torchvision, pyyaml, tqdm, matplotlib and
pytest but not omegaconf): fetch its wheel where there is network and carry it along (wheels/ is
git-ignored; omegaconf 2.4 is pure Python and needs only PyYAML),

    python -m pip download omegaconf==2.4.0 --no-deps -d wheels/
    pip install --no-index wheels/*.whl && PYTHONPATH=. python -m benchmarks.gpu_check --commit <sha>

`--smoke` runs every section at tiny sizes on the CPU, one thread per process (CUDA-only checks say
"skipped: no CUDA"), so the command is known to work before any GPU minute is spent on it.

Modules: plan.py (the plan, launching a run), sections.py (1, 2, 5, 8), device_profile.py (3), speedrun.py (4),
correctness.py (6), to_accuracy.py (7), cli.py (the budgeted run and its report).
"""

from benchmarks.gpu_check.cli import main

__all__ = ["main"]
