"""The prefill worker (`baton serve-prefill`): computes a prompt's KV and first token and
pushes them into a decode worker's reservation.

`server.py` is the process entry point, `service.py` its servicer; the shared runtime is
`baton.worker`.
"""
