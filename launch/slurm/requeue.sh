# shellcheck shell=bash
# Sourced by the sbatch scripts (after `cd "$SLURM_SUBMIT_DIR"`): preemption and requeue.
#
# SLURM signals a job before it ends it: SIGUSR1 120 s before the time limit (--signal=USR1@120 in
# the scripts) and SIGTERM on preemption. fasttrain treats both as "preempted": every rank saves one
# checkpoint together at the next step boundary, writes RUN_DIR/preempted.json and exits with code
# 75. Then this script puts the job back in the queue (it keeps its job ID, so RUN_DIR, and
# resume=auto continues from the checkpoint). Any other exit is passed on unchanged.

# torchrun dies on SIGUSR1 unless told to handle it (it then passes it on to the workers and waits
# for them); torch versions without the variable ignore it, and the workers get the signal from SLURM
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}

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
