# shellcheck shell=bash
# Shared bash of the cluster checks (.ci/multinode_ssh.sh, .ci/slurm.sh); sourced after they set WORK and say().
kill_leftover_ranks() {  # processes of our runs only: their command lines hold our work directory
  local pids
  pids=$(pgrep -f -- "--output_dir=$WORK/" || true)
  if [ -n "$pids" ]; then
    say "killing leftover processes of these runs: $pids"
    # shellcheck disable=SC2086  # one pid per word
    kill -9 $pids 2>/dev/null || true
  fi
}
