#!/usr/bin/env bash
# Installs what the benchmark suite runs beside Chunkyard: restic and borg (the peers), e2fsprogs (mkfs.ext4 -d
# builds the fleet's guest filesystem), qemu-utils (qemu-img/qemu-io make and change the VHDX disks) and debootstrap
# (a real Debian root for the guest image; the fleet falls back to this machine's own files without it) and GNU time
# (the peak memory of each measured command).
# Idempotent: installs only what is missing, and runs `apt-get update` only when it has to install something.
set -euo pipefail

declare -A tool_of=(
    [restic]=restic
    [borgbackup]=borg
    [e2fsprogs]=mkfs.ext4
    [qemu-utils]=qemu-img
    [debootstrap]=debootstrap
    [time]=/usr/bin/time
)
missing=()
for package in "${!tool_of[@]}"; do
    command -v "${tool_of[$package]}" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-peers: missing ${missing[*]} and no apt-get; install them by hand" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
echo "install-peers: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
