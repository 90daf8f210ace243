"""tritarget.service: the gRPC service (``tritarget serve``).

Reading order: ``errors`` (domain errors, no grpc), ``backend`` (the dynamic batcher
in front of ``tritarget.kernels.assign``, no grpc), ``codec`` (messages <-> jobs and
targets, limits), ``status`` (the one error -> status-code mapping), ``servicer``
(decode -> batcher -> encode), ``auth`` (bearer-token interceptor), ``metrics``
(Prometheus), ``health`` (gRPC health, its watches ended at a stop), ``gpu_wait`` (how
threads wait for a GPU), ``server`` (wiring, reflection, shutdown), ``cli``;
``arguments`` and ``output`` are what the ``tritarget`` commands share (number flags,
output files), ``stop_signals`` what the server and ``serve --workers``' parent stop on.
"""
