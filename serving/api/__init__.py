"""The wire: what a caller and both servers agree on. No Ray, no torch (a caller copies
these files): grpcio, protobuf and numpy only.

  wire.py    service name, method paths, the deadline header and its reader
  codec.py   PredictRequest -> validated Batch, scores -> PredictResponse
  errors.py  typed serving errors (no grpc import: shards and the tower raise them too)
  status.py  the one place where those errors become gRPC status codes
  client.py  RankingClient: numpy in, scores out
"""
