# Why this file exists: the `celery` peer stack, i.e. what a Python team would write to run the
# forecast model behind a task queue: Celery 5 with Redis as broker and result backend, one
# task per job doing the same pack + run as xpand's worker (common.forecast). bench.py starts
# `celery -A celery_app worker --pool prefork --concurrency 2` from this directory; client.py
# submits with send_task(...).get().
#
# Redis: 127.0.0.1:6379, DB $PEERS_REDIS_DB (15 by default) so other users of that Redis are not
# touched; bench.py flushes that DB (and only it) before and after.

import os

from celery import Celery
from celery.signals import worker_process_init

import common

REDIS_URL = f"redis://127.0.0.1:6379/{int(os.environ.get('PEERS_REDIS_DB', '15'))}"


def make_app() -> Celery:
    app = Celery("peers", broker=REDIS_URL, backend=REDIS_URL)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Keep the Redis connection on loopback only: no DNS for the broker host.
        broker_transport_options={"socket_connect_timeout": 5},
    )
    return app


app = make_app()
_session = None


@worker_process_init.connect
def _load_model(**_):
    # One session per prefork child, created after the fork (ORT sessions do not survive one).
    global _session
    _session = common.new_session()


@app.task(name="peers.forecast")
def forecast(series, horizon):
    global _session
    if _session is None:
        _session = common.new_session()
    return common.forecast(_session, series, horizon)
