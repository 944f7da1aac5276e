# Shared by the stage launchers (sourced, not run): `launch ENTRY.py [fixed args] -- "$@"`.
# Adds the real-size architecture (MiniMind2-small: hidden 512, 8 layers, 8 heads, 2 KV heads)
# unless --from_weight is given (then the checkpoint's config rules); flags given by the user win.
# NPROC>1 runs it under torchrun (gloo on CPU, nccl on CUDA); NNODES>1 spreads it over machines: run the
# same command on each with NODE_RANK=0..NNODES-1 and MASTER_ADDR (node 0's address; MASTER_PORT 29500).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

launch() {
  local fixed=() user=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do fixed+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  user=("$@")
  local defaults=(--hidden_size 512 --num_layers 8 --num_heads 8 --num_kv_heads 2)
  for arg in ${user[@]+"${user[@]}"}; do
    case "$arg" in --from_weight|--from_weight=*) defaults=() ;; esac
  done
  local runner=(python)
  if [ "${NNODES:-1}" -gt 1 ]; then
    runner=(python -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "${NPROC:-1}"
            --node_rank "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on each machine}"
            --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}" --master_port "${MASTER_PORT:-29500}")
  elif [ "${NPROC:-1}" -gt 1 ]; then
    runner=(python -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
  fi
  exec "${runner[@]}" "${fixed[@]}" ${defaults[@]+"${defaults[@]}"} ${user[@]+"${user[@]}"}
}
