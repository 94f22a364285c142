"""Training: a run built from its config, its epochs of steps, validation, and `fasttrain eval`.

    lifecycle.py      train(cfg): join the ranks, claim the run folder, build, resume, fit, finish and clean up
    session.py        TrainingSession: a run's parts and the order of events (epochs, validation, records,
                      checkpoints, callbacks)
    callbacks.py      what happens around the steps: preemption, planned stops, periodic checkpoints, sinks, progress
    loop.py           one epoch: the step loop, its boundaries and the log-interval reductions
    step.py           THE TRAINING STEP: EagerStep and CapturedStep, behind one contract (`Step`)
    device_optim.py   the optimizer inside a captured step: hyperparameters as device tensors, SGD in foreach ops
    build.py          a run's parts from the config: data, model, optimizer, schedule, step, evaluator
    optim.py          optimizers (param groups) and schedules, registered by name
    precision.py      autocast and fp16's GradScaler
    averaging.py      the EMA of the weights and lookahead
    validation.py     validation at training speed (compiled, padded, captured on CUDA), test-time augmentation
    cuda_graphs.py    recording and replaying a CUDA graph (the captured step's and the evaluator's)
    compile_cache.py  where torch.compile keeps its graphs, and what it counted
    evaluate.py       `fasttrain eval CHECKPOINT`

Nothing is re-exported here: each caller names the module it uses.
"""
