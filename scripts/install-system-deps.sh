#!/bin/sh
# System packages the full test suite needs (the Kamailio end-to-end test):
# Kamailio with its Python engine, and sipp.  Installs only what is missing;
# needs root (CI and the developers' machines run as root).  Every other
# module the example configs load (tm, tmx, rr, dialog, acc, sanity, ...)
# ships in the kamailio package itself (dpkg -S dialog.so: kamailio).
set -eu
need=""
command -v kamailio >/dev/null 2>&1 || need="$need kamailio"
[ -e /usr/lib/x86_64-linux-gnu/kamailio/modules/app_python3.so ] || \
    ls /usr/lib/*/kamailio/modules/app_python3.so >/dev/null 2>&1 || need="$need kamailio-python3-modules"
command -v sipp >/dev/null 2>&1 || need="$need sip-tester"
# Prometheus: the exporter is tested against a real server (tests/test_prometheus.py)
command -v prometheus >/dev/null 2>&1 || need="$need prometheus"
# gcc: builds ingest's compiled scanner (npcalls/ingest/_scan.c, optional for users; the
# tests check it was built) and its AddressSanitizer run (tests/test_acc_scan.py)
command -v gcc >/dev/null 2>&1 || need="$need gcc libc6-dev"
# setpriv: the read-only `npcalls check` test drops root's file-mode override with it
command -v setpriv >/dev/null 2>&1 || need="$need util-linux"
if [ -n "$need" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install-system-deps: need root to install:$need" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $need
fi
