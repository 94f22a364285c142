# shellcheck shell=bash
# Sourced by the sbatch scripts (after `cd "$SLURM_SUBMIT_DIR"`): preemption and requeue.
#
# SLURM signals a job before it ends it: SIGTERM to the job steps 120 s before the time limit
# (--signal=TERM@120 in the scripts), and SIGTERM to everything on preemption. fasttrain treats it as
# "preempted": every rank saves one checkpoint together at the next step boundary, writes
# RUN_DIR/preempted.json and exits with code 75. Then this script puts the job back in the queue (it
# keeps its job ID, so RUN_DIR, and resume=auto continues from the checkpoint). Any other exit is
# passed on unchanged.
#
# Why SIGTERM and not SIGUSR1 for the advance warning: torchrun passes SIGTERM on to its workers and
# waits for them (30 s) in every torch version, while SIGUSR1 kills a torchrun that was not started
# with --signals-to-handle (and torchrun overwrites TORCHELASTIC_SIGNALS_TO_HANDLE with that
# option). fasttrain itself also stops on SIGUSR1 (checkpoint.signals), e.g. under srun without torchrun.

# SIGTERM also reaches this batch shell: survive it, so that the requeue below still runs
trap 'echo "batch script: SIGTERM received; fasttrain saves a checkpoint and stops"' TERM

# requeue_if_preempted RUN_DIR STATUS: requeue (exit 0) when the run left preempted.json, else exit STATUS
requeue_if_preempted() {
  local run_dir=$1 status=$2
  if [[ -f "$run_dir/preempted.json" ]]; then
    echo "fasttrain was preempted: $(cat "$run_dir/preempted.json")"
    echo "requeueing job ${SLURM_JOB_ID}: it resumes from its checkpoint in $run_dir"
    scontrol requeue "${SLURM_JOB_ID}" || echo "scontrol requeue failed: SLURM may be requeueing the job itself" >&2
    exit 0
  fi
  exit "$status"
}
