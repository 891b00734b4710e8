# Sourced by the GPU scripts that run `skdcgn run` for the three MNIST variants at once (a small
# CNN leaves a GPU mostly idle). The caller defines `args VARIANT` (the run's options), `left`
# (seconds of budget left), LOGS and RECORD (a results file, or empty: not recorded), and may
# define `after_variant VARIANT` (printed after a variant finishes).
#   run_side_by_side colored double_colored wildlife
run_side_by_side() {
  declare -A pid
  local v
  for v in "$@"; do
    timeout "$(left)" python3 -m skdcgn run $(args "$v") > "$LOGS/$v.log" 2>&1 &
    pid[$v]=$!
  done
  for v in "$@"; do
    if wait "${pid[$v]}"; then
      [ -n "$RECORD" ] && python3 -m skdcgn run $(args "$v") --record "$RECORD" >> "$LOGS/$v.log" 2>&1
      echo "$v: done$([ -n "$RECORD" ] && echo ", recorded") ($(left) s left)"
      if declare -F after_variant > /dev/null; then after_variant "$v"; fi
    else
      echo "$v: not finished in the budget ($(left) s left); rerun the script to resume it"
    fi
  done
}
