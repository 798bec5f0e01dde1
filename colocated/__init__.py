"""The colocated worker (`baton serve-colocated`): one engine runs both phases of a
request (classic continuous batching); the router sends `Generate` calls straight to it.

`server.py` is the process entry point, `service.py` its servicer; the shared runtime is
`baton.worker`.
"""
