#!/usr/bin/env bash
# install-debian.sh -- the PostgreSQL stack pgtraj runs on, for Debian 12 (bookworm) + PostgreSQL 15.
#
#   from Debian's archive:  postgresql-15, PostGIS 3 (3.3), PL/Python (plpython3u), pg_cron, server headers
#   built from Debian source packages (sha256-pinned):
#                           pgvector 0.8.0, MobilityDB 1.3.0 (+ one SQL fix), h3-pg 4.2.3 (+ the H3 C core)
#   built from upstream release tarballs (sha256-pinned; no Debian package of these versions exists, so
#   they come from PGTRAJ_SOURCES when the pool does not serve them, and are skipped with a warning when
#   neither has them):
#                           pgvector 0.8.6 over 0.8.0 (HNSW vacuum fixes; `pgtraj install` updates each
#                           database's extension), Citus 13.2.2 (+ a one-line fix for PostgreSQL 15.20)
#
# Idempotent: each step is skipped when its result is already installed, so a re-run takes well under a
# second. CI calls this before every test run; users run it once (as root or through sudo).
#
# Environment:
#   PGTRAJ_BUILD_DIR  build + download cache (default /var/cache/pgtraj-build)
#   PGTRAJ_SOURCES    folder holding copies of the pinned source files, used when the Debian pool no longer
#                     serves one (default: ../shared/pg-stack/sources next to the checkout, when present)
#   DEBIAN_POOL       Debian mirror pool URL (default http://deb.debian.org/debian/pool/main)
#   FORCE=1           rebuild the source-built extensions
set -Eeuo pipefail

PGV=15
PG_CONFIG=/usr/lib/postgresql/$PGV/bin/pg_config
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=${PGTRAJ_BUILD_DIR:-/var/cache/pgtraj-build}
CACHE=$WORK/downloads
FORCE=${FORCE:-0}
DEBIAN_POOL=${DEBIAN_POOL:-http://deb.debian.org/debian/pool/main}
PYPI_FILES=https://files.pythonhosted.org/packages
SOURCES=${PGTRAJ_SOURCES:-$HERE/../../shared/pg-stack/sources}
JOBS=$(nproc)
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
trap 'echo "install-debian.sh: FAILED at line $LINENO: $BASH_COMMAND (build logs: $WORK/*.log)" >&2' ERR

APT_PKGS="postgresql-$PGV postgresql-$PGV-postgis-3 postgresql-plpython3-$PGV postgresql-$PGV-cron
  postgresql-server-dev-$PGV postgresql-client-$PGV build-essential dpkg-dev cmake curl ca-certificates
  python3-venv python3-dev libgeos-dev libgsl-dev libjson-c-dev libproj-dev libkrb5-dev"

# path-in-pool sha256 -- the sha256 values are those of Debian's signed Sources index and PyPI's index
PGVECTOR="p/pgvector/pgvector_0.8.0-1.dsc a71780bf7ab9901094a3d9869c489b6e2bcb858a8c14a5fa52d159933e016308
p/pgvector/pgvector_0.8.0.orig.tar.gz 867a2c328d4928a5a9d6f052cd3bc78c7d60228a9b914ad32aa3db88e9de27b0
p/pgvector/pgvector_0.8.0-1.debian.tar.xz 6cb10bfdee32a093f0711a53d61f63657514d60058ff76a44ae2a4434f9c7ee5"
MOBILITYDB="m/mobilitydb/mobilitydb_1.3.0-2.dsc 1f41d10368a8aeab463303aa17100eb4e920f1c213d0250e7df0d0879501d752
m/mobilitydb/mobilitydb_1.3.0.orig.tar.gz 2851c322a6250d7502d91817d9e4a4fb56715c403c1eeb5aa32990041b076dfe
m/mobilitydb/mobilitydb_1.3.0-2.debian.tar.xz 8a2d79e7666880b2faab642566b9520f14dfb13381443a59d4bc5f793c0b7640"
H3PG="h/h3-pg/h3-pg_4.2.3.orig.tar.gz 3c420e8ee3324bfeac600cadf3c7a7bc26c3b95e123d48e40459d34dcd714654"
# upstream tags v0.8.6 and v13.2.2 (../shared/pg-stack/README.md); the patch makes Citus' private copy of
# have_createdb_privilege() not collide with the one PostgreSQL 15.20 exports
PGVECTOR_086="p/pgvector/pgvector-0.8.6.tar.gz 5743dac39fdfa740533cf95e71b033bd5513b71dda194b3cf19464ccbf76f3fb"
CITUS="c/citus/citus-13.2.2.tar.gz dd2453caec20a830e5e63f1def5c5a98cb6f57ae510407cdcd800916fcdab430
c/citus/citus-13.2.2-pg15.20.patch 4548c8cdcde3f0b9c068d6230df0e6f13500d50f57e30e5377f973337caa42ce"
# h3-pg's CMake downloads the H3 C core from GitHub; the h3-py sdist vendors the same core (src/h3lib).
H3CORE="25/2a/dac23698122456ce12345e0a1408c23bc389eaffab5eb7689b8e080d9dfb/h3-4.2.2.tar.gz 5cc78d546b5c732f480a842e3e436c393fe37fe59b063fe9cb5589206b7c4c7e"

log() { printf '== %s\n' "$*"; }

# fetch BASE_URL "path sha256" lines -> $CACHE/<basename>, checksum-verified, local copy as fallback
fetch() {
  local base=$1 path sum f
  while read -r path sum; do
    f=$CACHE/$(basename "$path")
    if [ -f "$f" ] && echo "$sum  $f" | sha256sum -c --status; then continue; fi
    if ! curl -fsSL --retry 2 --connect-timeout 15 -o "$f.part" "$base/$path" 2>/dev/null; then
      [ -f "$SOURCES/$(basename "$path")" ] || {
        echo "ERROR: cannot download $base/$path and no local copy in $SOURCES" >&2; return 1; }
      echo "   (the pool does not serve $(basename "$path"); using $SOURCES)"
      cp "$SOURCES/$(basename "$path")" "$f.part"
    fi
    mv "$f.part" "$f"
    echo "$sum  $f" | sha256sum -c --status || { echo "ERROR: sha256 mismatch for $f" >&2; rm -f "$f"; return 1; }
  done <<<"$2"
}

# unpack TARBALL DIR: a fresh DIR holding the tarball's top folder's contents
unpack() { rm -rf "$2"; mkdir -p "$2"; tar -xzf "$1" -C "$2" --strip-components=1; }

installed() { [ "$FORCE" != 1 ] && for f in "$@"; do [ -e "$f" ] || return 1; done; }

step_apt() {
  local p missing=
  for p in $APT_PKGS; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing="$missing $p"
  done
  if [ -z "$missing" ]; then log "apt: all packages present"; return; fi
  log "apt: installing$missing"
  # pgtraj manages its own clusters: no auto-created 'main' cluster on port 5432
  $SUDO mkdir -p /etc/postgresql-common/createcluster.d
  echo 'create_main_cluster = false' | $SUDO tee /etc/postgresql-common/createcluster.d/pgtraj-no-main.conf >/dev/null
  $SUDO apt-get update -qq
  # plpython3/server-dev come from bookworm-security and pull the server up to the same minor version
  $SUDO apt-get install -y -q --no-install-recommends $APT_PKGS >"$WORK/apt.log" 2>&1 \
    || { tail -30 "$WORK/apt.log" >&2; return 1; }
}

step_pgvector() {
  if installed "$EXT/vector--0.8.0.sql" "$LIB/vector.so"; then log "pgvector 0.8.0: present"; return; fi
  log "pgvector 0.8.0: building"
  fetch "$DEBIAN_POOL" "$PGVECTOR"
  rm -rf "$WORK/src/pgvector"
  dpkg-source -x "$CACHE/pgvector_0.8.0-1.dsc" "$WORK/src/pgvector" >"$WORK/pgvector.log" 2>&1
  # OPTFLAGS="" : no -march=native, so the library runs on any x86-64 machine the image lands on
  make -C "$WORK/src/pgvector" -j"$JOBS" PG_CONFIG=$PG_CONFIG OPTFLAGS="" >>"$WORK/pgvector.log" 2>&1
  $SUDO make -C "$WORK/src/pgvector" install PG_CONFIG=$PG_CONFIG >>"$WORK/pgvector.log" 2>&1
}

step_pgvector_086() {
  if installed "$EXT/vector--0.8.6.sql" "$EXT/vector--0.8.0.sql" "$LIB/vector.so"; then
    log "pgvector 0.8.6: present"; return; fi
  if ! fetch "$DEBIAN_POOL" "$PGVECTOR_086" 2>"$WORK/pgvector-0.8.6.log"; then
    log "pgvector 0.8.6: WARNING no source (set PGTRAJ_SOURCES to a folder with pgvector-0.8.6.tar.gz); staying on 0.8.0"
    return; fi
  log "pgvector 0.8.6: building (over 0.8.0, whose scripts stay for the upgrade path)"
  local src="$WORK/src/pgvector-0.8.6"
  unpack "$CACHE/pgvector-0.8.6.tar.gz" "$src"
  make -C "$src" -j"$JOBS" PG_CONFIG=$PG_CONFIG OPTFLAGS="" >>"$WORK/pgvector-0.8.6.log" 2>&1
  $SUDO make -C "$src" install PG_CONFIG=$PG_CONFIG >>"$WORK/pgvector-0.8.6.log" 2>&1
}

step_citus() {
  if installed "$EXT/citus.control" "$LIB/citus.so" && grep -q "^default_version = '13.2-1'" "$EXT/citus.control"; then
    log "Citus 13.2.2: present"; return; fi
  if ! fetch "$DEBIAN_POOL" "$CITUS" 2>"$WORK/citus.log"; then
    log "Citus 13.2.2: WARNING no source (set PGTRAJ_SOURCES to a folder with citus-13.2.2.tar.gz and its patch);"
    log "              single-node pgtraj works without it"
    return; fi
  log "Citus 13.2.2: building (1.5 to 6 minutes on 2 cores)"
  local src="$WORK/src/citus"
  unpack "$CACHE/citus-13.2.2.tar.gz" "$src"
  patch -d "$src" -p1 <"$CACHE/citus-13.2.2-pg15.20.patch" >>"$WORK/citus.log" 2>&1
  (cd "$src" && ./configure PG_CONFIG=$PG_CONFIG --without-libcurl --without-lz4) >>"$WORK/citus.log" 2>&1
  make -C "$src" -j"$JOBS" >>"$WORK/citus.log" 2>&1
  $SUDO make -C "$src" install >>"$WORK/citus.log" 2>&1
}

step_mobilitydb() {
  local sqlf="$EXT/mobilitydb--1.3.0.sql" src="$WORK/src/mobilitydb"
  if installed "$sqlf" "$LIB/libMobilityDB-1.3.so" \
     && grep -A1 'span_intersection(datespanset, date)' "$sqlf" | grep -q 'RETURNS datespanset'; then
    log "MobilityDB 1.3.0: present"; return; fi
  log "MobilityDB 1.3.0: building"
  fetch "$DEBIAN_POOL" "$MOBILITYDB"
  rm -rf "$src"; dpkg-source -x "$CACHE/mobilitydb_1.3.0-2.dsc" "$src" >"$WORK/mobilitydb.log" 2>&1
  # Upstream bug: span_intersection(datespanset, date) is declared RETURNS date but returns a span set;
  # PostgreSQL 15.20 then rejects CREATE EXTENSION ("commutator operator * does not return the same
  # data type as operator *"). Fix the declaration before cmake generates the extension script.
  perl -0pi -e 's/(CREATE FUNCTION span_intersection\(datespanset, date\)\n\s+RETURNS )date\b/${1}datespanset/' \
    "$src/mobilitydb/sql/temporal/009_spanset_ops.in.sql"
  grep -A1 'span_intersection(datespanset, date)' "$src/mobilitydb/sql/temporal/009_spanset_ops.in.sql" \
    | grep -q 'RETURNS datespanset'
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DPOSTGRESQL_PG_CONFIG=$PG_CONFIG >>"$WORK/mobilitydb.log" 2>&1
  cmake --build "$src/build" -j"$JOBS" >>"$WORK/mobilitydb.log" 2>&1
  $SUDO cmake --install "$src/build" >>"$WORK/mobilitydb.log" 2>&1
}

step_h3() {
  if installed "$EXT/h3--4.2.3.sql" "$EXT/h3_postgis--4.2.3.sql" "$LIB/h3.so" "$LIB/h3_postgis.so"; then
    log "h3-pg 4.2.3: present"; return; fi
  log "h3-pg 4.2.3: building"
  fetch "$DEBIAN_POOL" "$H3PG"
  fetch "$PYPI_FILES" "$H3CORE"
  local src="$WORK/src/h3-pg" core="$WORK/src/h3core"
  unpack "$CACHE/h3-pg_4.2.3.orig.tar.gz" "$src"
  unpack "$CACHE/h3-4.2.2.tar.gz" "$core"
  # point CMake's FetchContent at the vendored core; it is linked statically into h3.so
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DPostgreSQL_CONFIG=$PG_CONFIG \
        -DFETCHCONTENT_SOURCE_DIR_H3="$core/src/h3lib" -DFETCHCONTENT_FULLY_DISCONNECTED=ON \
        -DBUILD_TESTING=OFF >"$WORK/h3.log" 2>&1
  cmake --build "$src/build" -j"$JOBS" >>"$WORK/h3.log" 2>&1
  $SUDO cmake --install "$src/build" >>"$WORK/h3.log" 2>&1
}

$SUDO mkdir -p "$WORK/src" "$CACHE"
[ -w "$WORK" ] || $SUDO chown -R "$(id -u)" "$WORK"
step_apt
EXT=$($PG_CONFIG --sharedir)/extension
LIB=$($PG_CONFIG --pkglibdir)
step_pgvector
step_pgvector_086
step_mobilitydb
step_h3
step_citus
for e in postgis plpython3u vector mobilitydb h3 h3_postgis pg_cron citus; do
  v=$(sed -n "s/^default_version *= *'\?\([^']*\)'\?.*/\1/p" "$EXT/$e.control" 2>/dev/null)
  [ -n "$v" ] || [ "$e" = citus ] || { echo "ERROR: extension $e is not installed in $EXT" >&2; exit 1; }
  printf '   %-11s %s\n' "$e" "${v:-not built (optional: scale-out)}"
done
log "stack ready: PostgreSQL $($PG_CONFIG --version | awk '{print $2}')"
