# The closing line of scripts/test.sh, from cargo test's output (see there). Variables:
# skipped (tests that returned early, counted as passed by cargo), status (cargo's exit status),
# soak_passed / soak_failed (chaos soak runs, one test each).

  /^test result:/ {
    if ($3 == "FAILED.") failed_binaries++
    for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i-1); if ($(i) ~ /^failed/) f += $(i-1) }
  }
  # Each failed target is named (maybe twice): count distinct names.
  /to rerun pass `/ { t = $0; sub(/.*to rerun pass /, "", t); failed[t] = 1 }
  /^error: [0-9]+ targets? failed:/ { listing = 1; next }
  listing && /^    `--/ { t = $0; sub(/^ +/, "", t); failed[t] = 1; next }
  { listing = 0 }
  /^error: could not compile/ { f++ }
  END {
    for (t in failed) failed_targets++
    if (failed_targets > failed_binaries) f += failed_targets - failed_binaries
    p += soak_passed; f += soak_failed
    if (status != 0 && f == 0) f = 1
    printf "total: %d passed, %d failed, %d skipped\n", p - skipped, f, skipped
  }
