# Shared by scripts/test and scripts/standalone (sourced, not run): find the
# system packages a command needs, install them when this machine can (root
# with apt-get), otherwise stop and name them.
#
#   need_deb PKG           queue PKG for installation
#   need_build_deps        what building pgwarden needs (cargo; libclang for pg_query)
#   install_missing WHO    install the queue, or print it and exit 1

missing_debs=()

have() { command -v "$1" >/dev/null 2>&1; }

need_deb() {
    local p
    for p in "${missing_debs[@]}"; do
        [ "$p" = "$1" ] && return 0
    done
    missing_debs+=("$1")
}

need_build_deps() {
    have cargo || {
        echo "missing Rust toolchain (cargo): install it with rustup (https://rustup.rs) or the Debian packages cargo rustc" >&2
        exit 1
    }
    # pg_query builds libpg_query with bindgen, which needs libclang.
    if have dpkg; then
        dpkg -s libclang-dev >/dev/null 2>&1 || need_deb libclang-dev
    elif [ -z "${LIBCLANG_PATH:-}" ]; then
        echo "note: pg_query needs libclang (Debian/Ubuntu: libclang-dev); set LIBCLANG_PATH if the build cannot find it" >&2
    fi
}

install_missing() {
    local who=$1
    [ ${#missing_debs[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && have apt-get; then
        printf '%s: installing %s\n' "$who" "${missing_debs[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_debs[@]}" >/dev/null
        missing_debs=()
    else
        echo "$who: missing system packages: ${missing_debs[*]}" >&2
        echo "install them (Debian/Ubuntu): sudo apt-get install -y ${missing_debs[*]}" >&2
        exit 1
    fi
}

# need_disk GIB DIR: stop before a build that would die half-way with ENOSPC.
need_disk() {
    local want=$1 dir=$2 avail
    mkdir -p "$dir"
    avail=$(df -Pk "$dir" | awk 'NR==2 {print int($4 / 1048576)}')
    if [ "${avail:-0}" -lt "$want" ]; then
        echo "only ${avail} GiB free under $dir; building and testing pgwarden needs about ${want} GiB (free some space, or point CARGO_TARGET_DIR elsewhere)" >&2
        exit 1
    fi
}
