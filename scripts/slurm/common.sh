# shellcheck shell=bash
# Shared setup for scripts/slurm/*.sbatch. Sourced, never executed:
#
#   source "${SSD_REPO:-$PWD}/scripts/slurm/common.sh"
#
# Slurm runs a *copy* of the batch script from its spool directory, so the scripts cannot find the
# repository from their own path. They use $SSD_REPO if set, else the job's working directory
# (the directory `sbatch` was called from, or its --chdir): submit from the repository root, or
# export SSD_REPO.
#
# What this file does:
#   * cd to the repo, put it on PYTHONPATH, pick the interpreter ($PYTHON, default `python`);
#   * export the NCCL / torch.distributed variables below (each one explained);
#   * create $RESULTS_DIR (default results/$SLURM_JOB_ID) and record the job's environment there;
#   * provide helpers: ssd_model_args, ssd_single_node_env, ssd_multi_node_env,
#     ssd_record_environment, ssd_run.
#
# Logs: every script has `#SBATCH --output=logs/%x-%j.out` (job name + job id, stdout and stderr
# together), relative to the submit directory. Slurm does not create that directory: run
# `mkdir -p logs` once before the first sbatch.

set -euo pipefail

SSD_REPO="${SSD_REPO:-$PWD}"
if [[ ! -f "$SSD_REPO/bench/bench.py" ]]; then
    echo "common.sh: $SSD_REPO is not the ssd repository (no bench/bench.py);" \
         "submit from the repository root or export SSD_REPO" >&2
    exit 2
fi
cd "$SSD_REPO"
export PYTHONPATH="$SSD_REPO${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

# ---------------------------------------------------------------- environment
# Stream output into the Slurm log as it happens (not in 4 KiB blocks at exit).
export PYTHONUNBUFFERED=1

# NVLink SHARP / multicast ("NVLS"). On shared multi-GPU hosts multicast objects can take GPUs out
# of service for other tenants, and the engine does not need them: keep all three off. They are
# exported, so the processes the engine spawns (TP ranks, the draft) inherit them.
export NCCL_NVLS_ENABLE=0                 # NCCL: no NVLS collectives
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 # torch symmetric memory: no multicast objects
export NVSHMEM_DISABLE_NVLS=1             # NVSHMEM (used by torch symmetric memory): no NVLS

# NCCL prints warnings and errors only; set NCCL_DEBUG=INFO when submitting to debug topology,
# transport (P2P / SHM / NET/IB / NET/Socket) and interface selection.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# A failed or timed-out collective raises and tears the process group down instead of leaving
# ranks hanging until the Slurm time limit (the engine also sets collective timeouts).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# ---------------------------------------------------------------- results
RESULTS_DIR="${RESULTS_DIR:-$SSD_REPO/results/${SLURM_JOB_ID:-local-$$}}"
mkdir -p "$RESULTS_DIR"
export RESULTS_DIR

ssd_log() { echo "[$(date '+%F %T')] $*"; }

ssd_record_environment() {
    {
        echo "job: ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-}) on ${SLURM_JOB_NODELIST:-$(hostname)}"
        echo "git: $(git -C "$SSD_REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
        "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "gpus", torch.cuda.device_count())' 2>&1 || true
        command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 || true
        env | grep -E '^(SLURM_JOB|SLURM_NODELIST|SLURM_NTASKS|SLURM_CPUS|CUDA_VISIBLE|NCCL_|TORCH_|NVSHMEM_|MASTER_|GLOO_)' | sort
    } > "$RESULTS_DIR/environment.txt"
    ssd_log "results -> $RESULTS_DIR"
    cat "$RESULTS_DIR/environment.txt"
}

# ---------------------------------------------------------------- helpers

# Model arguments for bench.py, into the array SSD_MODEL_ARGS. Usage: ssd_model_args FAMILY SIZE DRAFT
# (FAMILY llama|qwen; SIZE/DRAFT as bench.py's --size/--draft, e.g. llama 70 1, qwen 32 0.6).
#   MODEL_DIR set  -> --FAMILY --target "$MODEL_DIR" --draft-path "$DRAFT_DIR" (real checkpoints;
#                     DRAFT_DIR is then required: a random-weight draft cannot serve a real target)
#   otherwise      -> --FAMILY --size SIZE --draft DRAFT --random-weights --profile "$SSD_PROFILE":
#                     random weights at the presets' real shapes; acceptance is replayed from the
#                     profile (default "code"; SSD_PROFILE=none to measure the random draft's own,
#                     meaningless, acceptance). The bench labels such results "simulated acceptance".
ssd_model_args() {
    local family="$1" size="$2" draft="$3" profile="${SSD_PROFILE:-code}"
    SSD_MODEL_ARGS=("--$family")
    if [[ -n "${MODEL_DIR:-}" ]]; then
        : "${DRAFT_DIR:?MODEL_DIR is set: also set DRAFT_DIR to the draft checkpoint}"
        SSD_MODEL_ARGS+=(--target "$MODEL_DIR" --draft-path "$DRAFT_DIR")
    else
        SSD_MODEL_ARGS+=(--size "$size" --draft "$draft" --random-weights)
        if [[ "$profile" != none ]]; then
            SSD_MODEL_ARGS+=(--profile "$profile")
        fi
    fi
}

# Single-node jobs: the engine spawns its own ranks and rendezvouses on a free local port. It
# treats a process as externally launched (torchrun / srun) when RANK+WORLD_SIZE, or
# SLURM_PROCID+SLURM_NTASKS+MASTER_ADDR are set; sbatch sets SLURM_PROCID, so stray MASTER_ADDR /
# RANK values exported by the submitting shell must not leak into a single-node job.
ssd_single_node_env() {
    unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT
}

# The address Slurm itself reaches node $1 at: its NodeAddr (slurm.conf), which is the node's name
# unless the site set an address (then the name may not even resolve).
ssd_node_address() {
    local line addr
    line="$(scontrol show node -o "$1" 2>/dev/null || true)"
    addr="$(sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' <<< "$line")"
    echo "${addr:-$1}"
}

# Multi-node jobs: rendezvous address from Slurm's environment (see ssd_two_node.sbatch).
#   MASTER_ADDR: the address of the allocation's first node (ssd_node_address), where world rank 0
#                (target TP rank 0) runs and hosts the TCP store.
#   MASTER_PORT: derived from the job id, so two jobs sharing a node never pick the same port.
# Network interfaces: NCCL and Gloo must use an interface the nodes can reach each other on.
#   NCCL_SOCKET_IFNAME: NCCL's bootstrap / socket transport; default here excludes loopback and
#                       docker bridges ("^" = exclude). Set e.g. NCCL_SOCKET_IFNAME=ib0 or eth0.
#   GLOO_SOCKET_IFNAME: the same for Gloo (CPU-side process-group traffic); only set when given.
#   NCCL_IB_HCA:        InfiniBand adapters NCCL may use (e.g. mlx5_0,mlx5_1 or =mlx5_0:1);
#                       unset lets NCCL use all. Export it before sbatch if your site requires it.
ssd_multi_node_env() {
    local hosts
    # no `| head`: under pipefail an early-closing reader can kill the job with SIGPIPE (exit 141)
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    MASTER_ADDR="$(ssd_node_address "${hosts[0]}")"
    MASTER_PORT="$((10000 + SLURM_JOB_ID % 50000))"
    export MASTER_ADDR MASTER_PORT
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
    if [[ -n "${SSD_NET_IFNAME:-}" ]]; then
        export NCCL_SOCKET_IFNAME="$SSD_NET_IFNAME" GLOO_SOCKET_IFNAME="$SSD_NET_IFNAME"
    fi
    if [[ -n "${NCCL_IB_HCA:-}" ]]; then
        export NCCL_IB_HCA
    fi
}

# The bench.py command line for the given arguments plus $SSD_BENCH_ARGS (extra flags,
# word-split), into the array SSD_CMD; also written to $RESULTS_DIR/command.txt.
ssd_bench_cmd() {
    local extra=()
    if [[ -n "${SSD_BENCH_ARGS:-}" ]]; then
        read -r -a extra <<< "$SSD_BENCH_ARGS"
    fi
    SSD_CMD=("$PYTHON" bench/bench.py "$@" "${extra[@]}")
    printf '%q ' "${SSD_CMD[@]}" > "$RESULTS_DIR/command.txt"
    echo >> "$RESULTS_DIR/command.txt"
    ssd_log "command: $(cat "$RESULTS_DIR/command.txt")"
}

# Run bench.py in this process (single-node jobs; the engine spawns its own ranks).
ssd_run() {
    ssd_bench_cmd "$@"
    "${SSD_CMD[@]}"
}
