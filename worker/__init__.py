"""What every worker process shares; the role folders (`prefill/`, `decode/`, `colocated/`)
build on it. Each role folder holds its whole process: `server.py` (the `baton serve-*`
entry point) and `service.py` (its gRPC servicer).

- `flags`: the worker command line -> `EngineArgs` + `WorkerOptions` (the operator's contract).
- `runtime`: `run_worker` (build the engine, serve, exit status), the steps it shares with
  the in-process `baton serve` (`load_engine`, `ready_servicer`, `serve_engine`)
  and `WorkerRuntime` (gRPC server, health, /metrics, SIGTERM drain, in-flight accounting).
- `servicer`: `EngineServicer`, the base of the role servicers (Info, Stats, Abort,
  streaming engine outputs as chunks, engine errors -> gRPC status codes).
- `messages`: Python objects <-> the worker API's protobuf messages; the router uses it too.
- `local`: `LocalStub`, the worker API's client for a servicer in the router's own process
  (the in-process `baton serve`, baton/inprocess.py): direct calls, gRPC's codes and errors.

Importing this package, `messages`, `servicer` or `runtime` loads no torch: the engine is
imported when `run_worker` builds it (and `flags` reads its config when parsing).
"""
