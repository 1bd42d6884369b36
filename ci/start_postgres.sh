#!/usr/bin/env bash
# Start a PostgreSQL server on loopback for the shared-study test and print its URL.
# Installs Debian's postgresql package when the server is missing (CI machines start bare).
set -euo pipefail
if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | grep -q "^$version main"; then
  pg_createcluster "$version" main >&2
fi
pg_ctlcluster "$version" main start >&2 || true   # already running is fine
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
su postgres -c "psql -q -c \"DO \\\$\\\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='autocpu') THEN CREATE ROLE autocpu LOGIN PASSWORD 'autocpu'; END IF; END \\\$\\\$;\"" >&2
su postgres -c "psql -q -tc \"SELECT 1 FROM pg_database WHERE datname='autocpu_test'\" | grep -q 1 || createdb -O autocpu autocpu_test" >&2
echo "postgresql://autocpu:autocpu@127.0.0.1:5432/autocpu_test"
