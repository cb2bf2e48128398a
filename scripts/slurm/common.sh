# shellcheck shell=bash
# Shared setup for scripts/slurm/*.sbatch. Sourced, never executed. Each script looks for it (the
# same preamble in every script) in $SSD_REPO/scripts/slurm, next to the script itself, in the
# job's working directory and in $SLURM_SUBMIT_DIR, and stops with a one-line message if none has
# it: under sbatch, Slurm runs a *copy* of the batch script from its spool directory, so the script
# cannot find the repository from its own path there — submit from the repository root (the job's
# working directory is then the repository, unless `sbatch --chdir` says otherwise), or export
# SSD_REPO. Run with plain `bash scripts/slurm/X.sbatch`, the script finds this file next to itself
# from any directory.
#
# What this file does:
#   * cd to the repo ($SSD_REPO, default: the repository this file is in), put it on PYTHONPATH,
#     pick the interpreter ($PYTHON, default `python`);
#   * export the NCCL / torch.distributed variables below (each one explained);
#   * set $RESULTS_DIR (default results/$SLURM_JOB_ID); nothing is created on sourcing: the
#     scripts validate their inputs first, then ssd_record_environment creates the directory;
#   * provide helpers: ssd_model_args, ssd_single_node_env, ssd_multi_node_env, ssd_die,
#     ssd_record_environment, ssd_bench_cmd, ssd_run.
#
# Bash: 4.0 or newer (mapfile); arrays that may be empty are expanded as ${a[@]+"${a[@]}"}, which
# `set -u` accepts on bash before 4.4 too.
#
# Logs: every script has `#SBATCH --output=logs/%x-%j.out` (job name + job id, stdout and stderr
# together), relative to the submit directory. Slurm does not create that directory: run
# `mkdir -p logs` once before the first sbatch.

set -euo pipefail

SSD_REPO="${SSD_REPO:-$(cd "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)}"
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
# Only named here; ssd_record_environment creates it, after the script has validated its inputs,
# so a job refused at start-up leaves no empty results/<id>/ (or results/local-<pid>/) behind.
RESULTS_DIR="${RESULTS_DIR:-$SSD_REPO/results/${SLURM_JOB_ID:-local-$$}}"
export RESULTS_DIR

ssd_log() { echo "[$(date '+%F %T')] $*"; }

# A refused start: one line on stderr, exit 2 (before anything is created).
ssd_die() {
    echo "${SLURM_JOB_NAME:-${0##*/}}: $*" >&2
    exit 2
}

# Creates $RESULTS_DIR and writes environment.txt there; call it once the inputs are validated.
ssd_record_environment() {
    mkdir -p "$RESULTS_DIR"
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

# Model arguments for bench.py, into the array SSD_MODEL_ARGS. Usage: ssd_model_args FAMILY [SIZE [DRAFT]]
# (FAMILY llama|qwen; SIZE/DRAFT as bench.py's --size/--draft). An empty or missing SIZE/DRAFT
# follows the family: llama 70 / 1 (Llama-3.1-70B + Llama-3.2-1B), qwen 32 / 0.6 (Qwen3-32B +
# Qwen3-0.6B), so SSD_FAMILY=qwen alone gives the Qwen pair.
#   MODEL_DIR set  -> --FAMILY --target "$MODEL_DIR" --draft-path "$DRAFT_DIR" (real checkpoints;
#                     DRAFT_DIR is then required: a random-weight draft cannot serve a real target)
#   otherwise      -> --FAMILY --size SIZE --draft DRAFT --random-weights --profile "$SSD_PROFILE":
#                     random weights at the presets' real shapes; acceptance is replayed from the
#                     profile (default "code"; SSD_PROFILE=none to measure the random draft's own,
#                     meaningless, acceptance). The bench labels such results "simulated acceptance".
ssd_model_args() {
    local family="$1" size="${2:-}" draft="${3:-}" profile="${SSD_PROFILE:-code}"
    case "$family" in
        llama) size="${size:-70}" draft="${draft:-1}" ;;
        qwen)  size="${size:-32}" draft="${draft:-0.6}" ;;
        *)     ssd_die "SSD_FAMILY=$family: use llama or qwen" ;;
    esac
    SSD_MODEL_ARGS=("--$family")
    if [[ -n "${MODEL_DIR:-}" ]]; then
        [[ -n "${DRAFT_DIR:-}" ]] || ssd_die "MODEL_DIR is set: also set DRAFT_DIR to the draft checkpoint"
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
# Also sets the array SSD_HOSTS (the allocation's hosts, in Slurm's order). Outside a Slurm job
# (plain `bash`, no SLURM_JOB_NODELIST / SLURM_JOB_ID) it stops with a one-line message.
ssd_multi_node_env() {
    if [[ -z "${SLURM_JOB_NODELIST:-}" || -z "${SLURM_JOB_ID:-}" ]]; then
        ssd_die "not inside a Slurm job: run it with sbatch: it needs Slurm's node list (SLURM_JOB_NODELIST) and job id"
    fi
    command -v scontrol >/dev/null || ssd_die "scontrol not found: it is needed to expand SLURM_JOB_NODELIST"
    SSD_HOSTS=()
    # no `| head`: under pipefail an early-closing reader can kill the job with SIGPIPE (exit 141)
    mapfile -t SSD_HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    if (( ${#SSD_HOSTS[@]} == 0 )); then
        ssd_die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no hosts"
    fi
    MASTER_ADDR="$(ssd_node_address "${SSD_HOSTS[0]}")"
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

# $SSD_BENCH_ARGS split into words as a shell would, into the array SSD_EXTRA_ARGS: blanks
# separate, '...' "..." and backslashes quote, so SSD_BENCH_ARGS='--dataset "/data/my prompts.jsonl"'
# passes the path as one argument. Nothing is expanded or executed ($VAR, globs, $(...) stay
# literal; no eval): the splitting is xargs' (POSIX quoting; a quote cannot span lines). An
# unbalanced quote stops the job with a one-line message.
ssd_extra_args() {
    local arg problem
    SSD_EXTRA_ARGS=()
    if [[ -z "${SSD_BENCH_ARGS:-}" ]]; then
        return 0
    fi
    if ! problem="$(printf '%s\n' "$SSD_BENCH_ARGS" | xargs -r printf '%s\0' 2>&1 >/dev/null)"; then
        ssd_die "SSD_BENCH_ARGS: ${problem%%;*} in: $SSD_BENCH_ARGS"
    fi
    while IFS= read -r -d '' arg; do
        SSD_EXTRA_ARGS+=("$arg")
    done < <(printf '%s\n' "$SSD_BENCH_ARGS" | xargs -r printf '%s\0')
}

# Checked now, on sourcing, so a malformed SSD_BENCH_ARGS is refused before anything is created.
ssd_extra_args

# The bench.py command line for the given arguments plus $SSD_BENCH_ARGS (SSD_EXTRA_ARGS), into
# the array SSD_CMD; also written to $RESULTS_DIR/command.txt (created if needed).
ssd_bench_cmd() {
    SSD_CMD=("$PYTHON" bench/bench.py "$@" ${SSD_EXTRA_ARGS[@]+"${SSD_EXTRA_ARGS[@]}"})
    mkdir -p "$RESULTS_DIR"
    printf '%q ' "${SSD_CMD[@]}" > "$RESULTS_DIR/command.txt"
    echo >> "$RESULTS_DIR/command.txt"
    ssd_log "command: $(cat "$RESULTS_DIR/command.txt")"
}

# Run bench.py in this process (single-node jobs; the engine spawns its own ranks).
ssd_run() {
    ssd_bench_cmd "$@"
    "${SSD_CMD[@]}"
}
