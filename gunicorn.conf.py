"""gunicorn settings every way of serving the app shares (gunicorn reads this file from the working directory).

Command-line flags (workers, threads, bind) still win over these.
"""

# Idle keep-alive connections are closed after this many seconds. gunicorn's default of 2 s lost a request
# under load: when a busy worker's event loop came round late, it closed a connection whose client had
# already sent its next request (benchmarks/load_test.py saw one ConnectionError in 1,302 searches).
keepalive = 75
