#!/usr/bin/env bash
# Shared body of launch/slurm/*.sbatch (sourced; not run on its own).
#
# Outside an allocation (`bash launch/slurm/finetune.sbatch`): submits the calling script with sbatch, the
# allocation taken from the variables at its top. Inside the job: one DeepSpeed launcher per node
# (`deepspeed --hostfile H --no_ssh --node_rank=$SLURM_NODEID`, hostfile written from the allocation, master =
# the first node's NodeAddr), shielded from the preemption signal (`trap "" USR1`) that its workers handle:
# they save a checkpoint and requeue the job (pipeline/stopping.py); exit code 75 from the program, when it
# could not requeue itself (no scontrol inside a container), is turned into `scontrol requeue` here.
set -euo pipefail

REQUEUE_EXIT_CODE=75

relalign_submit() {   # $1: the sbatch script; the rest go to sbatch after the variables' options
    local script="$1"; shift
    mkdir -p "$LOG_DIR"
    local opts=(--job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_NODE"
                --time="$TIME_LIMIT" --signal="USR1@$SIGNAL_LEAD_S" --requeue --open-mode=append
                --output="$LOG_DIR/%x-%j.out" --export=ALL)
    [[ -n "$PARTITION" ]] && opts+=(--partition="$PARTITION")
    [[ "$GPUS_PER_NODE" != 0 ]] && opts+=(--gpus-per-node="$GPUS_PER_NODE")
    RELALIGN_ROOT="$RELALIGN_ROOT" exec sbatch "${opts[@]}" "$@" "$script"
}

relalign_master_addr() {   # the first node's address (node names need not resolve)
    local first addr
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    addr="$(scontrol show node "$first" | grep -o 'NodeAddr=[^ ]*' | head -n 1 | cut -d= -f2)"
    echo "${addr:-$first}"
}

relalign_hostfile() {   # $1: path; one "name slots=K" line per node of the allocation
    local slots="$PROCS_PER_NODE"
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$slots/" > "$1"
}

relalign_launch() {   # $1: the entry point (launch/finetune.py ...); the rest: its arguments
    local nodes="$SLURM_JOB_NUM_NODES" hostfile="$LOG_DIR/hostfile-$SLURM_JOB_ID"
    local addr port rc=0
    addr="$(relalign_master_addr)"
    port="${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"
    relalign_hostfile "$hostfile"
    local gpus=()
    [[ "$GPUS_PER_NODE" != 0 ]] && gpus=(--num_gpus "$PROCS_PER_NODE")
    echo "[slurm] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $nodes node(s) x $PROCS_PER_NODE" \
         "rank(s), master $addr:$port, logs $LOG_DIR/$SLURM_JOB_NAME-$SLURM_JOB_ID-node<k>.out"
    srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 --open-mode=append \
         --output="$LOG_DIR/%x-%j-node%n.out" \
         bash -c 'trap "" USR1; exec deepspeed --hostfile "$0" --no_ssh --node_rank="$SLURM_NODEID" \
                  --master_addr "$1" --master_port "$2" "${@:3}"' \
         "$hostfile" "$addr" "$port" "${gpus[@]}" "$@" || rc=$?
    if [[ "$rc" == "$REQUEUE_EXIT_CODE" ]]; then
        echo "[slurm] stopped with a complete checkpoint; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    return "$rc"
}

relalign_overrides() {   # OVERRIDES="a.b=1 c=2" -> --set a.b=1 --set c=2
    local item
    for item in $OVERRIDES; do printf -- '--set\n%s\n' "$item"; done
}
