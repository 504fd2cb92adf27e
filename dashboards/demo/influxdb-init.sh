#!/bin/sh
# Run once by the influxdb:2 image after DOCKER_INFLUXDB_INIT_MODE=setup (files in
# /docker-entrypoint-initdb.d). InfluxQL reads a bucket through a DBRP mapping: map database "capmon",
# retention policy "autogen" to the bucket setup created. The image exports the bucket's id and the
# admin token to init scripts, and its `influx` CLI is already configured for them.
set -eu
influx v1 dbrp create \
  --org "${DOCKER_INFLUXDB_INIT_ORG}" \
  --bucket-id "${DOCKER_INFLUXDB_INIT_BUCKET_ID}" \
  --db "${DOCKER_INFLUXDB_INIT_BUCKET}" \
  --rp autogen \
  --default
