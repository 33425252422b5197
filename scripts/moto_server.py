"""moto's server for oppsync's tests, handling one request at a time.

moto's DynamoDB backend takes no locks, and `moto_server` runs it under a threaded server: two
requests from two connections interleave, so a conditional write or an ADD can read an item
another request is changing, and an update is lost (a CI run counted 597 of 600 concurrent
increments). DynamoDB makes each single-item write atomic; one lock around each request gives
moto the same promise. Requests still arrive on many kept-alive connections at once.

Usage: python scripts/moto_server.py HOST PORT
"""

import signal
import sys
import threading

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple


def one_at_a_time(app):
    lock = threading.Lock()

    def serve(environ, start_response):
        with lock:
            # The body is produced under the lock too: moto builds it from live objects.
            return list(app(environ, start_response))

    return serve


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, one_at_a_time(app), threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
