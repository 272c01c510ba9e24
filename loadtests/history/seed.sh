#!/usr/bin/env bash
# Gives a gateway's database a history: N finished forecast jobs (default 1,000,000), each with
# its one done shard, owned by an account of their own and finished over the last six days
# (inside the retention window, so the expirer leaves them alone). It is how the load test
# checks that a job's cost does not grow with the jobs before it: run it against the database
# `xpand up` created, then run the load test again and compare with the fresh figure.
#
# The history is jobs and shards only: no ledger entries or sealed records (those tables are
# read by id ranges and per account, not scanned per job), and tiny inputs, so a million jobs
# take about a minute rather than gigabytes.
#
#   loadtests/history/seed.sh postgres://postgres@127.0.0.1:5432/xpand 1000000
set -euo pipefail
url="${1:?usage: seed.sh <database url> [jobs]}"
jobs="${2:-1000000}"
batch=100000
psql() { command psql "$url" -v ON_ERROR_STOP=1 -qAt "$@"; }

account=$(psql -c "INSERT INTO accounts (id, name, kind)
                   VALUES (gen_random_uuid(), 'load-test history', 'customer') RETURNING id")
done_so_far=0
while (( done_so_far < jobs )); do
    n=$(( jobs - done_so_far < batch ? jobs - done_so_far : batch ))
    psql -c "
        WITH made AS (
            SELECT gen_random_uuid() AS id,
                   now() - (random() * interval '6 days') AS finished_at
            FROM generate_series(1, $n)),
        job AS (
            INSERT INTO jobs (id, account_id, kind, status, input, params, output, quote, max_fee,
                              escrow, gateway_fee, cost, shards_total, shards_done, created_at,
                              updated_at, started_at, finished_at)
            SELECT id, '$account', 'forecast', 'succeeded', '{\"series\":[[1,2,3]]}',
                   '{\"horizon\":1}', '{\"forecasts\":[[4]]}', 1013, 2000, 1013, 1000, 1013,
                   1, 1, finished_at - interval '20 ms', finished_at,
                   finished_at - interval '15 ms', finished_at
            FROM made RETURNING id, finished_at)
        INSERT INTO shards (id, job_id, idx, row_offset, row_count, model, task, fee, status,
                            attempts, assigned_at, output, output_sha256, completed_at)
        SELECT gen_random_uuid(), id, 0, 0, 1, 'forecast-mlp',
               '{\"kind\":\"forecast\",\"series\":[[1,2,3]],\"horizon\":1}', 13, 'done', 1,
               finished_at - interval '10 ms', '{\"kind\":\"forecast\",\"forecasts\":[[4]]}',
               repeat('0', 64), finished_at
        FROM job"
    done_so_far=$(( done_so_far + n ))
    echo "seed: $done_so_far of $jobs finished jobs" >&2
done
psql -c "VACUUM ANALYZE jobs" -c "VACUUM ANALYZE shards"
