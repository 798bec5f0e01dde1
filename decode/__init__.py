"""The decode worker (`baton serve-decode`): reserves KV blocks, receives a prompt's KV from
a prefill worker and streams the output.

`server.py` is the process entry point, `service.py` its servicer; the shared runtime is
`baton.worker`.
"""
