"""Several daemons, one service: tasks, the work queue and images shared in Redis.

Only used with `redis_url`; without it the daemon keeps everything in one
process (in-memory registry, SQLite journal), and nothing here is imported.

    store.py    the Redis layout: task records, one trimmed Stream per task, the queue
    mirror.py   writes the local actors' snapshots and records to Redis (never blocks them)
    watch.py    one blocking XREAD per daemon, fanned out to local broadcasters
    worker.py   takes work when a backend has room, keeps leases, claims expired ones
    images.py   images every daemon can serve (local disk, then Redis)
"""
