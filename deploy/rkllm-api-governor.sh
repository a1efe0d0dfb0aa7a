#!/bin/sh
# rkllm-api-governor start|stop: sets every NPU (devfreq) and CPU (cpufreq) frequency
# governor that offers "performance" to it, saving the previous ones; stop puts them
# back. Installed by setup.sh --governor and run by rkllm-api-governor.service.
# Rockchip's fix_freq_rk3588.sh / fix_freq_rk3576.sh pin board-specific frequencies
# instead; the performance governor reaches the same top frequencies on any board.
set -eu
SYSFS="${RKLLM_GOVERNOR_SYSFS:-/sys}"                         # tests use a fake tree
SAVED="${RKLLM_GOVERNOR_SAVED:-/run/rkllm-api-governor.saved}"

# One line per governor file: the file, then the file listing what it accepts.
governor_files() {
    for file in "$SYSFS"/class/devfreq/*npu*/governor; do
        if [ -f "$file" ]; then echo "$file ${file%/governor}/available_governors"; fi
    done
    for file in "$SYSFS"/devices/system/cpu/cpufreq/policy*/scaling_governor; do
        if [ -f "$file" ]; then
            echo "$file ${file%/scaling_governor}/scaling_available_governors"
        fi
    done
}

start() {
    : > "$SAVED.new"
    governor_files | while read -r file accepted; do
        current=$(cat "$file")
        echo "$file $current" >> "$SAVED.new"
        if grep -qw performance "$accepted" 2>/dev/null && echo performance > "$file"; then
            echo "$file: performance (was $current)"
        else
            echo "$file: left at $current (no performance governor offered)"
        fi
    done
    # A restart must not save "performance" as the state to go back to.
    if [ -e "$SAVED" ]; then rm -f "$SAVED.new"; else mv "$SAVED.new" "$SAVED"; fi
}

stop() {
    if [ ! -f "$SAVED" ]; then echo "no saved governors"; return 0; fi
    while read -r file previous; do
        if [ -f "$file" ] && echo "$previous" > "$file"; then echo "$file: $previous"; fi
    done < "$SAVED"
    rm -f "$SAVED"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
