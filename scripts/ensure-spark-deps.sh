#!/usr/bin/env bash
# Install what the Spark engine needs when missing: Java 17 (Spark's JVM) and Debian's OpenBLAS
# (without a native BLAS, MLlib's ALS falls back to a slower Java BLAS).
set -euo pipefail
need=()
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0' || need+=(libopenblas0)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
echo "Spark engine: installing ${need[*]} from Debian's packages" >&2
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
