"""Checkpoints: save a run, choose one to continue from, and put it back exactly.

io.py          a file: atomic write, and a load that checks the hash and every key (WHERE A CHECKPOINT IS WRITTEN
               AND READ)
validate.py    a checkpoint's keys checked one by one, its weights finite, its config one fasttrain accepts
folder.py      the checkpoints/ folder: step-file names, resume=auto's choice, pruning, best.pt put back
state.py       what a checkpoint captures (RunState, each rank's RNG/buffers/sums) and restores; config diff
manager.py     the ranks' choreography: choose on rank 0, restore on every rank, save, prune, trim the records
writer.py      writes off the critical path: a copy to host memory, then a background thread (one write at a time)
digest.py      the content hash every checkpoint carries and every load checks
convert.py     `fasttrain convert-checkpoint`: an older, pickled checkpoint made data only (for a file the user trusts)
run_folder.py  output.dir: one run at a time (a lock), nothing written in it before the run is accepted
"""

from fasttrain.checkpoint.folder import remove_stale_temporaries, restore_best
from fasttrain.checkpoint.io import load_checkpoint, load_model_state, save_checkpoint
from fasttrain.checkpoint.manager import (choose_on_rank0, finish_writes, restore_on_every_rank,
                                          save_epoch_checkpoints, save_step_checkpoint, trim_history)
from fasttrain.checkpoint.run_folder import RunFolder
from fasttrain.checkpoint.state import NEUTRAL_KEYS, RunState
from fasttrain.checkpoint.writer import CheckpointWriter

__all__ = ["NEUTRAL_KEYS", "CheckpointWriter", "RunFolder", "RunState", "choose_on_rank0", "finish_writes",
           "load_checkpoint", "load_model_state", "remove_stale_temporaries", "restore_best", "restore_on_every_rank",
           "save_checkpoint", "save_epoch_checkpoints", "save_step_checkpoint", "trim_history"]
