"""What a run tells its user: the log, the metric files, the progress line, plots, and where the time went.

    logs.py         the run's log: the console, train.log (held until the run folder is accepted), silent ranks
    metrics.py      metrics.jsonl, metrics.csv, steps.jsonl and TensorBoard; the device's peak memory
    progress.py     the progress display and the one summary line per epoch
    timing.py       the time split: one clock, contiguous parts, the run's last line (no torch: the entry point
                    starts it before the heavy imports)
    plots.py        curves.png, throughput.png, time.png of a run folder (`fasttrain plot`)
    flops.py        a model's FLOPs per image and the device's peak, for MFU
    environment.py  env.json: versions, device, host, git commit

Nothing is re-exported here: each caller names the module, so that the entry point's early import of
timing.py stays as light as it is.
"""
