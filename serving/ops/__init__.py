"""Operating a stack on a machine: ports, loopback, scaling, the server thread, the state file. Standard
library (and Ray's own start-up settings) only; nothing here scores a request.

  ports.py          the ports ``recserve serve`` needs, checked before anything starts
  ingress.py        which process answers the gRPC port (the Router replica itself, or Serve's proxy)
  loopback.py       keep a local Ray + Serve stack on 127.0.0.1 (the worker set-up hook)
  scaling.py        scale one deployment through the Ray dashboard's Serve REST API
  server_thread.py  a grpc.aio server on its own loop in a thread; serve until a signal
  state.py          the state file a running `recserve serve` leaves for scale, deploy, checks
"""
